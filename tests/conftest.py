"""Test-suite rules shared by every test file.

Under ``CI=true`` a test skipped because headless Chromium is missing counts as a failure: the
report's browser tests skip on a developer machine without a browser, but CI (``.ci/run``
installs Chromium) must not go green without running them.
"""

from __future__ import annotations

import os

import pytest


def _on_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _on_ci() and "chromium" in str(report.longrepr).lower():
        report.outcome = "failed"
        report.longrepr = f"CI=true but the browser test was skipped: {report.longrepr}"
