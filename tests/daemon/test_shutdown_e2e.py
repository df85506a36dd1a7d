"""Stopping braidd (SIGTERM, what `systemctl stop braidd` sends) takes under a second, with the
server reachable or gone at the same moment, and in the middle of a download; it still removes
everything it added. Real processes in the namespace world."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest

from braid.netbed import LinkSpec, World
from braid.netbed.stack import BraidStack, start_traffic, wait_for

pytestmark = pytest.mark.netns

LINKS = [
    LinkSpec("eth0", "ethernet", rate_mbit=20, rtt_ms=10),
    LinkSpec("wlan0", "wifi", rate_mbit=20, rtt_ms=20),
]
SOCKS = "127.0.0.1:1080"
STOP_LIMIT = 1.0


@pytest.fixture(scope="module")
def before(world: World) -> str:
    """The laptop's network state before braidd ever ran."""
    return world.network_state()


@pytest.fixture(scope="module")
def stack(world: World, before: str) -> Iterator[BraidStack]:
    with BraidStack(world) as braid:
        yield braid


@pytest.fixture
def restarted(world: World, stack: BraidStack) -> Iterator[BraidStack]:
    """braidd running and connected, with the server reachable; back in that state afterwards."""
    if stack.daemon is None or stack.daemon.poll() is not None:
        stack.start_daemon()
        stack.up()
    assert wait_for(lambda: stack.status()["tunnel"]["pool_ready"] >= 1, 10), stack.status()
    yield stack
    for spec in LINKS:
        world.restore(spec.name)
    stack.start_daemon()
    stack.up()


def timed_stop(stack: BraidStack) -> tuple[float, int]:
    """SIGTERM to braidd; seconds until it exited, and its exit status."""
    proc = stack.daemon
    assert proc is not None and proc.poll() is None
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    status = proc.wait(15)
    return time.monotonic() - started, status


def download(world: World):
    return start_traffic(
        world, "download", world.target_v4, "--bytes", "200M", "--socks", SOCKS, "--timeout", "60"
    )


@pytest.mark.parametrize("server", ["reachable", "gone"])
def test_stop_takes_under_a_second_during_a_download(
    world: World, restarted: BraidStack, before: str, server: str
) -> None:
    proc = download(world)
    try:
        assert wait_for(lambda: restarted.status()["tunnel"]["flows_active"] >= 1, 10)
        time.sleep(0.5)
        if server == "gone":
            for spec in LINKS:
                world.blackhole(spec.name)
        took, status = timed_stop(restarted)
    finally:
        proc.kill()
        proc.wait()
    print(f"braidd stopped in {took:.3f} s (server {server}, during a download)")
    assert status == 0, restarted.logs()
    assert "Traceback" not in restarted.logs(), restarted.logs()
    assert took < STOP_LIMIT, restarted.logs()
    assert world.network_state() == before


@pytest.mark.parametrize("server", ["reachable", "gone"])
def test_stop_takes_under_a_second_when_idle(
    world: World, restarted: BraidStack, before: str, server: str
) -> None:
    if server == "gone":
        for spec in LINKS:
            world.blackhole(spec.name)
    took, status = timed_stop(restarted)
    print(f"braidd stopped in {took:.3f} s (server {server}, idle)")
    assert status == 0, restarted.logs()
    assert "Traceback" not in restarted.logs(), restarted.logs()
    assert took < STOP_LIMIT, restarted.logs()
    assert world.network_state() == before
