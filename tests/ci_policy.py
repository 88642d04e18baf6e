"""What a test run may end with: CI fails on any skip off a short allow-list, and on zero tests collected.

Hooks imported by ``tests/conftest.py``; a module of its own so that ``tests/test_ci_policy.py`` can load it into
a pytester run and watch it fail one.
"""

from __future__ import annotations

import os
import re

import pytest

# With CI=true (set by .ci/run) a skipped test fails the run unless its reason matches one of these: hardware
# CI cannot be asked to have. Anything else CI can provide (packages, gcc, PostgreSQL, ../shared/data), so a
# skip for it means CI did not test it. Keep this list short; a new entry needs a reason CI cannot fix.
CI_ALLOWED_SKIPS = (
    r"needs a CUDA GPU",
    r"a GPU is present: the skip path does not apply",
)


_IN_CI = pytest.StashKey[bool]()


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def pytest_configure(config) -> None:  # noqa: ANN001
    # Read once, when the run starts: a test that changes CI in its own environment (monkeypatch) does not
    # change what its report is held to.
    config.stash[_IN_CI] = in_ci()


def skip_reason(report) -> str:  # noqa: ANN001
    """The reason of a skipped report (``Skipped: `` prefix removed)."""
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return text.removeprefix("Skipped: ")


def allowed_in_ci(reason: str) -> bool:
    return any(re.search(pattern, reason) for pattern in CI_ALLOWED_SKIPS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # noqa: ANN001, ANN201
    """In CI, a test skipped for a reason off the allow-list is reported as failed, where it happened."""
    outcome = yield
    report = outcome.get_result()
    if item.config.stash.get(_IN_CI, False) and report.skipped and not hasattr(report, "wasxfail"):
        reason = skip_reason(report)
        if not allowed_in_ci(reason):
            report.outcome = "failed"
            report.longrepr = (f"skipped in CI (CI=true): {reason}\n"
                               "CI must run every test; a reason CI cannot fix belongs in CI_ALLOWED_SKIPS "
                               "(tests/ci_policy.py)")


def _skips_not_allowed(session) -> list[str]:  # noqa: ANN001
    """Skips left after the conversion above: whole modules skipped at collection (importorskip, a module-level
    skip), which no test report carries."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    reports = reporter.stats.get("skipped", []) if reporter is not None else []
    return [f"{r.nodeid or r.fspath}: {skip_reason(r)}" for r in reports
            if not hasattr(r, "wasxfail") and not allowed_in_ci(skip_reason(r))]


def pytest_sessionfinish(session, exitstatus):
    """No test collected (exit code 5: a wrong path, a marker filter that matches nothing, a conftest that
    hides everything) is a failure, not a quiet success-looking run: CI must never pass on zero tests."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if reporter is not None:
            reporter.write_line("no tests were collected: treated as a failure (exit code 1)", red=True)
    if session.config.stash.get(_IN_CI, False) and (skipped := _skips_not_allowed(session)):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if reporter is not None:
            reporter.write_line(f"CI=true and {len(skipped)} skipped at collection, off CI_ALLOWED_SKIPS "
                                "(tests/ci_policy.py): treated as a failure", red=True)
            for line in skipped:
                reporter.write_line(f"  {line}", red=True)
