"""System-wide mode's limits: UDP sessions, and the sockets their answers leave from, are
released when idle; redirected TCP flows are capped per local user.

One datagram to each of 200 ports of a target that answers on all of them; braidd's descriptors
are counted in /proc before, at the peak and after the sessions' idle time. Then uid 65534 opens
more TCP connections than it may, to a target that holds them.

braidd runs with BRAID_UDP_IDLE=3, so that the release happens within seconds, not a minute, and
with BRAID_FLOWS_PER_USER=20, so that the cap is reached with a few connections.
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
PER_USER = 20
HOLD_PORT = 22000
ENV = {"BRAID_UDP_IDLE": str(IDLE), "BRAID_FLOWS_PER_USER": str(PER_USER)}

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
    saved = {name: os.environ.get(name) for name in ENV}
    os.environ.update(ENV)
    try:
        braid = BraidStack(world)
        braid.__enter__()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
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
    assert wait_for(lambda: stack.status()["capture"]["udp_sessions"] == 0, IDLE * 2 + 5)


# Accepts and holds TCP connections on HOST:PORT; for each line on stdin prints how many it holds
# (after closing them all if the line says "close").
HOLDER = textwrap.dedent(
    """
    import selectors, socket, sys
    host, port = sys.argv[1], int(sys.argv[2])
    listener = socket.create_server((host, port), backlog=256)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(sys.stdin, selectors.EVENT_READ)
    held = []
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            if key.fileobj is listener:
                conn, _ = listener.accept()
                held.append(conn)
            else:
                line = sys.stdin.readline()
                if not line:
                    sys.exit(0)
                if line.strip() == "close":
                    for conn in held:
                        conn.close()
                    held.clear()
                print(len(held), flush=True)
    """
)

# Opens COUNT connections to HOST:PORT as uid 65534, holds them until its stdin closes.
FLOODER = textwrap.dedent(
    """
    import encodings.idna, os, socket, sys
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    held = []
    for _ in range(count):
        s = socket.socket()
        s.settimeout(5)
        s.connect((host, port))
        held.append(s)
    print("opened", flush=True)
    sys.stdin.read()
    """
)


def test_redirected_flows_are_capped_per_user(world: World, stack: BraidStack) -> None:
    holder = world.popen(
        "inet",
        [sys.executable, "-c", HOLDER, world.target_v4, str(HOLD_PORT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )

    def held(command: str = "") -> int:
        holder.stdin.write(command + "\n")
        holder.stdin.flush()
        return int(holder.stdout.readline())

    def flood(count: int) -> subprocess.Popen:
        proc = world.popen(
            "laptop",
            [sys.executable, "-c", FLOODER, world.target_v4, str(HOLD_PORT), str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip() == "opened"
        return proc

    def stop(proc: subprocess.Popen) -> None:
        proc.stdin.close()
        proc.wait(10)

    log_before = stack.daemon_log.stat().st_size
    try:
        assert holder.stdout.readline().strip() == "ready"
        first = flood(2 * PER_USER)
        try:
            # Only PER_USER of them reach the target through the tunnel; root still gets through.
            assert wait_for(lambda: held() >= PER_USER, 20), held()
            root = world.run(
                "laptop",
                ["curl", "-sS", "--max-time", "10", f"http://{world.target_v4}/bytes/100"],
                check=False,
                text=False,
            )
            assert root.returncode == 0 and len(root.stdout) == 100, root.stderr
            log = stack.daemon_log.read_bytes()[log_before:].decode(errors="replace")
            assert "refused a connection of uid 65534" in log, log[-3000:]
            assert held() == PER_USER
        finally:
            stop(first)
        # Once both ends have closed, their places are given back: the same user gets in again.
        held("close")
        flows = lambda: stack.status()["tunnel"]["flows_active"]  # noqa: E731
        assert wait_for(lambda: flows() == 0, 20), flows()
        again = flood(5)
        try:
            assert wait_for(lambda: held() >= 5, 20), held()
        finally:
            stop(again)
    finally:
        holder.stdin.close()
        holder.wait(10)
