"""Without Chromium the report's browser tests skip locally but fail under ``CI=true``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _browser_tests(ci: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": ci, "CHROMIUM": str(HERE / "no-such-chromium")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfs"]
        + [str(HERE / "test_report_browser.py")],
        capture_output=True,
        text=True,
        env=env,
        cwd=HERE.parent,
        check=False,
    )


def test_missing_chromium_fails_under_ci_and_skips_elsewhere():
    ci = _browser_tests("true")
    assert ci.returncode == 1, ci.stdout[-2000:]
    assert "CI=true but headless Chromium not installed" in ci.stdout
    local = _browser_tests("")
    assert local.returncode == 0, local.stdout[-2000:]
    assert "2 skipped" in local.stdout
