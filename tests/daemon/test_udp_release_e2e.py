"""System-wide mode: UDP sessions, and the sockets their answers leave from, are released when
idle. One datagram to each of 200 ports of a target that answers on all of them; braidd's
descriptors are counted in /proc before, at the peak and after the sessions' idle time.

braidd runs with BRAID_UDP_IDLE=3 so that the release happens within seconds, not a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from braid.netbed import LinkSpec, World
from braid.netbed.stack import BraidStack, wait_for

pytestmark = pytest.mark.netns

LINKS = [LinkSpec("eth0", "ethernet", rate_mbit=50, rtt_ms=10)]
FIRST_PORT, PORTS = 21000, 200
IDLE = 3

# Answers every datagram on PORTS ports of HOST until its stdin closes.
ECHO = textwrap.dedent(
    """
    import selectors, socket, sys
    host, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sel = selectors.DefaultSelector()
    for port in range(first, first + count):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((host, port))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    sel.register(sys.stdin, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            if key.fileobj is sys.stdin:
                sys.exit(0)
            data, peer = key.fileobj.recvfrom(2048)
            key.fileobj.sendto(data, peer)
    """
)

# One datagram to each port from one socket; how many answers came back, from which ports.
CLIENT = textwrap.dedent(
    """
    import json, socket, sys, time
    host, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for port in range(first, first + count):
        s.sendto(b"ping %d" % port, (host, port))
    s.settimeout(0.5)
    answered = set()
    deadline = time.monotonic() + 15
    while len(answered) < count and time.monotonic() < deadline:
        try:
            data, peer = s.recvfrom(2048)
        except TimeoutError:
            continue
        if data == b"ping %d" % peer[1]:
            answered.add(peer[1])
    print(json.dumps({"answered": len(answered)}))
    """
)


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture(scope="module")
def stack(world: World) -> Iterator[BraidStack]:
    saved = os.environ.get("BRAID_UDP_IDLE")
    os.environ["BRAID_UDP_IDLE"] = str(IDLE)
    try:
        braid = BraidStack(world)
        braid.__enter__()
    finally:
        if saved is None:
            os.environ.pop("BRAID_UDP_IDLE", None)
        else:
            os.environ["BRAID_UDP_IDLE"] = saved
    try:
        status = braid.call("up", pairing=braid.pairing_uri, mode="system")
        assert status["capture"]["in_force"] == "tunnel", status
        yield braid
    except BaseException:
        braid.__exit__(*sys.exc_info())
        raise
    else:
        braid.__exit__(None, None, None)


@pytest.fixture
def echo(world: World) -> Iterator[None]:
    proc = world.popen(
        "inet",
        [sys.executable, "-c", ECHO, world.target_v4, str(FIRST_PORT), str(PORTS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield
    finally:
        proc.stdin.close()
        proc.wait(10)


def test_udp_sessions_release_their_sockets(world: World, stack: BraidStack, echo) -> None:
    pid = stack.daemon.pid
    before = descriptors(pid)
    done = world.run(
        "laptop",
        [sys.executable, "-c", CLIENT, world.target_v4, str(FIRST_PORT), str(PORTS)],
        timeout=60,
    )
    answered = json.loads(done.stdout)["answered"]
    peak = descriptors(pid)
    sessions = stack.status()["capture"]["udp_sessions"]
    after = wait_for(lambda: (n := descriptors(pid)) <= before + 4 and n, IDLE * 4 + 10)
    after = after or descriptors(pid)
    print(
        f"\none datagram to each of {PORTS} UDP ports ({answered} answered, {sessions} "
        f"sessions): braidd descriptors before {before}, at the peak {peak}, "
        f"{IDLE} s idle later {after}"
    )
    assert answered == PORTS
    assert peak >= before + PORTS  # the sessions' tunnels and answer sockets were there
    assert after <= before + 4, (before, peak, after)
    assert stack.status()["capture"]["udp_sessions"] == 0
