"""The soak benchmark, short: traffic, a call, link flaps and connection churn for 45 s, then its report.

benchmarks/soak.py runs the same for 10 minutes and reports memory; here only what a short run can
judge: nothing failed, nothing logged an error, every process is still there and none of them
gained descriptors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from braid.netbed import unavailable_reason

pytestmark = pytest.mark.netns

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_short_soak_has_no_errors_and_no_descriptor_growth(tmp_path: Path) -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("PySide6", reason="the tray needs PySide6 (the gui extra)")
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import soak
    finally:
        sys.path.remove(str(BENCHMARKS))

    report = soak.run(45, png=None, out_json=tmp_path / "soak.json", with_tray=True)

    assert report["failures"] == [], report["failures"]
    assert report["errors_in_logs"] == [], report["errors_in_logs"]
    assert report["transfers"] >= 50, report["transfers"]
    assert report["flaps"] >= 2 and report["churn_rounds"] >= 2, report
    assert report["call_sent"] >= 1500, report  # a steady call the whole time
    assert set(report["processes"]) == {"braidd", "braid-server", "tray"}
    for name, process in report["processes"].items():
        assert process["fds_end"] > 0, f"{name} is gone"
        assert process["fds_growth"] <= 0.1, (name, process)
