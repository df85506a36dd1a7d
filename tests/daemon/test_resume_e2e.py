"""braidd connects again by itself when it starts (after a reboot), to the server the user left
it connected to; after the user's `down` it stays down. Real processes in the namespace world."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from braid.netbed import LinkSpec, World
from braid.netbed.stack import BraidStack, run_traffic, wait_for

pytestmark = pytest.mark.netns

LINKS = [
    LinkSpec("eth0", "ethernet", rate_mbit=20, rtt_ms=10),
    LinkSpec("wlan0", "wifi", rate_mbit=10, rtt_ms=30),
]


@pytest.fixture(scope="module")
def stack(world: World) -> Iterator[BraidStack]:
    with BraidStack(world) as braid:
        yield braid


def restart(stack: BraidStack) -> None:
    assert stack.stop_daemon() == 0
    stack.start_daemon()


def test_a_restarted_braidd_reconnects_as_left(world: World, stack: BraidStack) -> None:
    assert stack.status()["state"] in ("connected", "degraded")
    restart(stack)
    # Nobody says `up`: braidd reconnects on its own.
    assert wait_for(lambda: stack.status()["state"] in ("connected", "degraded"), 15), (
        stack.status()
    )
    socks = f"{stack.socks[0]}:{stack.socks[1]}"
    result = run_traffic(world, "download", world.target_v4, "--bytes", "200K", "--socks", socks)
    assert result["ok"] and result["sha256"] == result["expected_sha256"], result


def test_after_down_a_restarted_braidd_stays_down(world: World, stack: BraidStack) -> None:
    stack.call("down")
    restart(stack)
    time.sleep(3)  # time enough to have reconnected, as the test above shows
    assert stack.status()["state"] == "disconnected"
    # `up` without a pairing still uses the saved one.
    assert stack.call("up")["state"] in ("connected", "degraded")
