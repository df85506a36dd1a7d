"""braidd leaves the laptop's routing exactly as it found it: on stop, and after a crash."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator

import pytest

from braid.netbed import LinkSpec, World, unavailable_reason
from braid.netbed.stack import BraidStack, run_traffic, start_traffic
from braid.netbed.traffic import iter_json_lines

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
    with BraidStack(world) as braid:
        running = world.network_state()
        assert "lookup 18400" in running and "lookup 18401" in running
        assert "subflows 8" in running
        # The path manager's line: braidd decides each connection's subflows while it runs.
        assert "\nuserspace\n" in running and "\nkernel\n" in pristine

        assert braid.stop_daemon() == 0
        assert world.network_state() == pristine

        braid.start_daemon()
        braid.up()
        braid.stop_daemon(signal.SIGKILL)  # no chance to clean up
        assert world.network_state() != pristine

        assert braid.cleanup_daemon().returncode == 0
        assert world.network_state() == pristine

        # Killed again, then simply started again: the new run cleans up the old one's state.
        braid.start_daemon()
        braid.up()
        braid.stop_daemon(signal.SIGKILL)
        braid.start_daemon()
        braid.up()
        assert braid.stop_daemon() == 0
        assert world.network_state() == pristine


def test_cleanup_leaves_foreign_rules_and_endpoints_alone(world: World) -> None:
    foreign = [
        ["ip", "rule", "add", "from", "198.18.1.2", "lookup", "100", "priority", "1000"],
        ["ip", "route", "add", "default", "via", "198.18.1.1", "table", "100"],
        ["ip", "mptcp", "endpoint", "add", "198.18.2.2", "id", "5", "subflow", "dev", "wlan0"],
    ]
    for argv in foreign:
        world.run("laptop", argv)
    pristine = world.network_state()
    assert BraidStack(world).cleanup_daemon(world.workdir / "state").returncode == 0
    assert world.network_state() == pristine


def test_sigkill_mid_transfer_then_restart_restores_service(world: World) -> None:
    """A transfer is running when braidd is killed: the client sees an error (never corrupted
    data), a new braidd restores service by itself, and its cleanup leaves the namespace as it
    was before braidd ever ran."""
    pristine = world.network_state()
    for spec in world.links:
        world.set_rate(spec.name, 20)
    with BraidStack(world) as braid:
        transfer = start_traffic(
            world,
            "download",
            world.target_v4,
            "--bytes",
            str(64 << 20),
            "--seed",
            "killed",
            "--socks",
            f"{braid.socks[0]}:{braid.socks[1]}",
            "--progress",
            "--timeout",
            "10",
        )
        assert transfer.stdout is not None
        moved = 0
        for line in transfer.stdout:  # progress lines until a few MiB have passed
            moved = json.loads(line).get("bytes", 0)
            if moved >= 2 << 20:
                break
        assert moved >= 2 << 20, "the transfer never got going"
        braid.stop_daemon(signal.SIGKILL)
        rest, _ = transfer.communicate(timeout=30)
        result = list(iter_json_lines(rest))[-1]
        assert transfer.returncode == 1 and not result["ok"], result
        assert result["bytes"] < 64 << 20

        braid.start_daemon()  # cleans up what the killed one left, then serves again
        braid.up()
        after = run_traffic(
            world,
            "download",
            world.target_v4,
            "--bytes",
            str(4 << 20),
            "--seed",
            "after-kill",
            "--socks",
            f"{braid.socks[0]}:{braid.socks[1]}",
            "--timeout",
            "20",
        )
        assert after["ok"] and after["sha256"] == after["expected_sha256"], after

        braid.stop_daemon(signal.SIGKILL)
        assert braid.cleanup_daemon().returncode == 0
        assert world.network_state() == pristine
