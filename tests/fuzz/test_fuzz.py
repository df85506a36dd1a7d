"""A short coverage-guided fuzzing run of every parser (run.py does the long one: ./dev fuzz).

Each target runs for a few seconds in a child process of its own, two at a
time so that the whole run stays under a minute. Without atheris
(it has wheels for x86-64 Linux only) the test is skipped with the reason; with
CI set, as for BRAID_REQUIRE_NETNS, such a skip is a failure.
"""

from __future__ import annotations

import importlib.util
import os
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
from run import Result, fuzz
from targets import TARGETS

pytestmark = pytest.mark.fuzz

SECONDS = 4  # per target: 14 targets, two at a time, about 50 s in all
PARALLEL = 2
MIN_EXECS = 500  # the slowest target (a file written and read per input) runs thousands


def atheris_missing() -> str | None:
    if importlib.util.find_spec("atheris") is not None:
        return None
    reason = "atheris is not installed (pip install atheris; wheels exist for x86-64 Linux)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI requires the fuzzing run", pytrace=False)
    return reason


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """The selected targets, started together at the first test; each test waits for its own."""
    if reason := atheris_missing():
        pytest.skip(reason)
    selected = [
        item.callspec.params["name"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec")
    ]
    root = tmp_path_factory.mktemp("fuzz")
    with ThreadPoolExecutor(PARALLEL) as pool:
        yield {
            name: pool.submit(fuzz, name, SECONDS, root / "corpus", root / "findings")
            for name in selected
        }


@pytest.mark.parametrize("name", list(TARGETS))
def test_fuzz_target(name: str, runs: dict[str, Future[Result]]) -> None:
    result = runs[name].result()
    assert not result.error, result.error
    details = "\n".join(f"{f.kind}: {f.summary} ({f.artifact})" for f in result.findings)
    assert not result.findings, f"the fuzzer found inputs that break {name}:\n{details}"
    assert result.execs >= MIN_EXECS, f"only {result.execs} inputs ran:\n{result.log[-2000:]}"
    assert result.cov > 0, f"no coverage reported:\n{result.log[-2000:]}"
