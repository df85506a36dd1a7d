"""braidd leaves the laptop's routing exactly as it found it: on stop, and after a crash."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from braid.netbed import LinkSpec, World, unavailable_reason
from braid.netbed.stack import BraidStack

pytestmark = pytest.mark.netns


@pytest.fixture
def world() -> Iterator[World]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    links = [LinkSpec("eth0", "ethernet", None), LinkSpec("wlan0", "wifi", None)]
    with World(links) as w:
        yield w


def test_stop_and_crash_cleanup_restore_routing(world: World) -> None:
    pristine = world.network_state()
    braid = BraidStack(world)
    try:
        braid.start()
        running = world.network_state()
        assert "lookup 18400" in running and "lookup 18401" in running
        assert "subflows 8" in running

        assert braid.stop_daemon() == 0
        assert world.network_state() == pristine

        braid.start_daemon()
        braid.up()
        assert braid.daemon is not None
        braid.daemon.kill()  # SIGKILL: no chance to clean up
        braid.daemon.wait()
        assert world.network_state() != pristine

        world.run(
            "laptop",
            [
                sys.executable,
                "-m",
                "braid.cli",
                "daemon",
                "--cleanup",
                "--state-dir",
                str(braid.daemon_dir),
            ],
            capture_output=True,
        )
        assert world.network_state() == pristine

        # Killed again, then simply started again: the new run cleans up the old one's state.
        braid.start_daemon()
        braid.up()
        braid.daemon.kill()
        braid.daemon.wait()
        braid.start_daemon()
        braid.up()
        assert braid.stop_daemon() == 0
        assert world.network_state() == pristine
    except BaseException:
        print(braid.logs())
        raise
    finally:
        braid.stop()


def test_cleanup_leaves_foreign_rules_and_endpoints_alone(world: World) -> None:
    foreign = [
        ["ip", "rule", "add", "from", "198.18.1.2", "lookup", "100", "priority", "1000"],
        ["ip", "route", "add", "default", "via", "198.18.1.1", "table", "100"],
        ["ip", "mptcp", "endpoint", "add", "198.18.2.2", "id", "5", "subflow", "dev", "wlan0"],
    ]
    for argv in foreign:
        world.run("laptop", argv)
    pristine = world.network_state()
    world.run(
        "laptop",
        [
            sys.executable,
            "-m",
            "braid.cli",
            "daemon",
            "--cleanup",
            "--state-dir",
            str(world.workdir / "state"),
        ],
        capture_output=True,
    )
    assert world.network_state() == pristine
