"""Shared test setup.

Tests marked ``netns`` build network namespaces and need root. A user without
root gets a clear skip; with BRAID_REQUIRE_NETNS=1 (CI) such a skip is a failure.
"""

from __future__ import annotations

import logging
import os

import pytest

REQUIRE_NETNS = os.environ.get("BRAID_REQUIRE_NETNS") == "1"
NOT_ROOT_REASON = "needs root to build network namespaces (run the suite as root: sudo ./dev test)"


def pytest_configure(config):
    logging.getLogger("pyroute2").setLevel(logging.WARNING)


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    for item in items:
        if item.get_closest_marker("netns"):
            item.add_marker(pytest.mark.skip(reason=NOT_ROOT_REASON))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_NETNS and report.skipped and item.get_closest_marker("netns"):
        report.outcome = "failed"
        report.longrepr = (
            f"network test skipped but BRAID_REQUIRE_NETNS=1 requires it to run: {report.longrepr}"
        )
    if report.failed:
        # A failing end-to-end test shows what braidd and braid-server logged: a run in CI
        # leaves nothing else behind to read.
        stack = getattr(item, "funcargs", {}).get("stack")
        if stack is not None and callable(getattr(stack, "logs", None)):
            try:
                report.sections.append(("braid logs", stack.logs(tail=40000)))
            except Exception as exc:  # the report must not fail on its appendix
                report.sections.append(("braid logs", f"unreadable: {exc!r}"))
