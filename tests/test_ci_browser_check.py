"""Without Chromium the report's browser tests skip locally but fail under ``CI=true``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Runs pytest on the browser tests with Chromium hidden: os.access (which shutil.which uses
# too) reports every path naming chromium as not executable.
HIDE_CHROMIUM = """
import os, sys
real_access = os.access
os.access = lambda path, mode, **kw: "chromium" not in str(path) and real_access(path, mode, **kw)
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-rfEs", sys.argv[1]]))
"""


def _browser_tests(ci: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", HIDE_CHROMIUM, str(HERE / "test_report_browser.py")],
        capture_output=True,
        text=True,
        env={**os.environ, "CI": ci},
        cwd=HERE.parent,
        check=False,
    )


def test_missing_chromium_fails_under_ci_and_skips_elsewhere():
    ci = _browser_tests("true")
    assert ci.returncode == 1, ci.stdout[-2000:]
    assert "CI=true but" in ci.stdout and "passed" not in ci.stdout
    local = _browser_tests("")
    assert local.returncode == 0, local.stdout[-2000:]
    assert " skipped" in local.stdout and "passed" not in local.stdout
