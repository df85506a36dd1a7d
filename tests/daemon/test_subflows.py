"""Subflow counts: only MPTCP subflows to the server's own address and port count.

Real MPTCP and TCP connections on the loopback of a namespace of the test's own, with a second
address and an MPTCP endpoint on it, so that one connection has two subflows; then braidd in the
test world, with plain TCP connections to the server's port held next to its tunnels.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from braid.netbed import LinkSpec, World
from braid.netbed.stack import BraidStack, wait_for
from braid.netbed.world import child_env

LINKS = [LinkSpec("eth0", "ethernet", rate_mbit=50, rtt_ms=10)]

SERVER, OTHER, SECOND = "198.18.0.1", "198.18.0.2", "198.18.0.3"

SCENE = textwrap.dedent(
    f"""
    import json, socket, time
    from braid.daemon.stats.subflows import count_subflows
    MPTCP = 262
    listeners = []
    for host, port in (("{SERVER}", 443), ("{SERVER}", 8443), ("{OTHER}", 443)):
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM, MPTCP)
        s.bind(("::ffff:" + host, port))
        s.listen()
        listeners.append(s)
    held = []

    def connect(proto, host, port, family=socket.AF_INET, source=None):
        c = socket.socket(family, socket.SOCK_STREAM, proto)
        if source:
            c.bind((source, 0))
        c.connect((host, port))
        c.sendall(b"x")
        held.append(c)

    connect(MPTCP, "{SERVER}", 443, source="{SERVER}")      # a tunnel: joined from {SECOND}
    connect(MPTCP, "::ffff:{SERVER}", 443, socket.AF_INET6, source="::ffff:{SERVER}")
    connect(socket.IPPROTO_TCP, "{SERVER}", 443)            # plain TCP, same address and port
    connect(MPTCP, "{SERVER}", 8443)                         # MPTCP, another port
    connect(MPTCP, "{OTHER}", 443)                           # MPTCP, another host's HTTPS
    for listener in listeners:  # answered: the connections are then fully established
        listener.setblocking(False)
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                break
            conn.sendall(b"y")
            held.append(conn)
    deadline = time.monotonic() + 5
    counts = {{}}
    while time.monotonic() < deadline:
        counts = count_subflows(["{SERVER}"], 443)
        if counts.get("{SECOND}"):
            break
        time.sleep(0.05)
    print(json.dumps(counts))
    """
)


def test_only_mptcp_subflows_to_the_server_count(empty_netns: str) -> None:
    def ip(*args: str) -> None:
        subprocess.run(["ip", "-n", empty_netns, *args], check=True, capture_output=True)

    for address in (SERVER, OTHER, SECOND):
        ip("address", "add", f"{address}/32", "dev", "lo")
    ip("mptcp", "limits", "set", "subflows", "2")
    ip("mptcp", "endpoint", "add", SECOND, "dev", "lo", "subflow")
    done = subprocess.run(
        ["ip", "netns", "exec", empty_netns, sys.executable, "-c", SCENE],
        capture_output=True,
        text=True,
        timeout=30,
        env=child_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout)
    # Two tunnels started from SERVER (one on an IPv6 socket, mapped); each also joined from
    # SECOND. Nothing else: not the plain TCP connection, the other port or the other host.
    assert counts == {SERVER: 2, SECOND: 2}, counts


def test_nothing_counts_without_a_server() -> None:
    from braid.daemon.stats.subflows import count_subflows

    assert count_subflows([], 443) == {}


# Holds COUNT plain TCP connections to HOST:PORT until its stdin closes.
HOLD = textwrap.dedent(
    """
    import socket, sys
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    held = [socket.create_connection((host, port), timeout=5) for _ in range(count)]
    print("held", flush=True)
    sys.stdin.read()
    """
)


@pytest.mark.netns
def test_braidd_counts_its_tunnels_not_other_connections_to_the_server(world: World) -> None:
    with BraidStack(world) as stack:

        def counted() -> tuple[int, int]:
            """Subflows counted, and braidd's tunnels: the pool's and the datagram session's."""
            status = stack.status()
            session = 1 if status["datagram"]["session"] else 0
            return status["links"][0]["subflows"], status["tunnel"]["pool_ready"] + session

        # The pool's tunnels, one subflow each on the only link.
        assert wait_for(lambda: (c := counted())[0] >= 1 and c[0] == c[1], 10), counted()
        holder = world.popen(
            "laptop",
            [sys.executable, "-c", HOLD, world.server_v4, str(stack.server_port), "6"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout.readline().strip() == "held"
            time.sleep(2.5)  # two samples
            subflows, pooled = counted()
        finally:
            holder.stdin.close()
            holder.wait(10)
    assert subflows == pooled, (subflows, pooled)
