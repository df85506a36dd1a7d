"""A tunnel that waited in the pool starts its congestion control afresh (transport.py)."""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from braid import transport
from braid.transport import MptcpUnavailable, mptcp_socket, restart_congestion_control


def algorithm(sock: socket.socket) -> bytes:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).split(b"\0")[0]


def connected_pair(family_socket) -> Iterator[tuple[socket.socket, socket.socket]]:
    listener = family_socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = family_socket()
    client.connect(listener.getsockname())
    server, _ = listener.accept()
    try:
        yield client, server
    finally:
        for s in (client, server, listener):
            s.close()


def plain() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


def mptcp() -> socket.socket:
    try:
        return mptcp_socket(socket.AF_INET)
    except MptcpUnavailable as exc:
        pytest.skip(f"no MPTCP here: {exc.strerror}")


@pytest.mark.parametrize("make", [plain, mptcp], ids=["tcp", "mptcp"])
def test_a_restarted_connection_keeps_its_own_algorithm(make) -> None:
    for client, server in connected_pair(make):
        before = algorithm(client)
        if before == b"reno":
            pytest.skip("this namespace's default algorithm is reno: nothing to restart")
        assert restart_congestion_control(client) is True
        assert restart_congestion_control(server) is True
        assert algorithm(client) == before and algorithm(server) == before
        client.sendall(b"still connected")
        assert server.recv(64) == b"still connected"


TCP_CC_INFO = 26  # linux/tcp.h; for BBR: struct tcp_bbr_info


def test_a_restart_starts_the_algorithm_afresh() -> None:
    """BBR after a transfer knows the path's bandwidth; restarted, it knows nothing again, as on
    a new connection (the state whose stale round trip sent idle tunnels into PROBE_RTT)."""
    if b"bbr" not in Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_bytes():
        pytest.skip("this kernel has no BBR")
    for client, server in connected_pair(plain):
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"bbr")
        except PermissionError:
            pytest.skip("BBR is not allowed for this user here")
        done = threading.Thread(target=drain, args=(server, 1 << 20))
        done.start()
        client.sendall(bytes(1 << 20))
        done.join(10)
        assert bandwidth(client) > 0
        assert restart_congestion_control(client) is True
        assert bandwidth(client) == 0 and algorithm(client) == b"bbr"


def bandwidth(sock: socket.socket) -> int:
    """BBR's bandwidth estimate (bytes per second)."""
    low, high = struct.unpack("2I", sock.getsockopt(socket.IPPROTO_TCP, TCP_CC_INFO, 8))
    return high << 32 | low


def drain(sock: socket.socket, count: int) -> None:
    while count > 0:
        count -= len(sock.recv(1 << 16)) or count


def test_reno_has_nothing_to_restart() -> None:
    for client, _server in connected_pair(plain):
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"reno")
        assert restart_congestion_control(client) is False
        assert algorithm(client) == b"reno"


def test_something_that_is_not_a_tcp_socket_is_left_alone() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        assert restart_congestion_control(udp) is False
    assert restart_congestion_control(None) is False  # a transport without a socket


class FakeSocket:
    """Reports ``algorithm``; refuses to be switched to any name in ``refused``."""

    def __init__(self, algorithm: bytes, refused: set[bytes]) -> None:
        self.algorithm, self.refused = algorithm, refused
        self.set: list[bytes] = []

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        return self.algorithm.ljust(size, b"\0")

    def setsockopt(self, level: int, option: int, value: bytes) -> None:
        self.set.append(value)
        if value in self.refused:
            raise PermissionError(1, "Operation not permitted")


def test_an_algorithm_that_cannot_be_given_back_is_said_once(monkeypatch, caplog) -> None:
    """Reno is taken, the algorithm is refused back (the allowed list changed meanwhile)."""
    monkeypatch.setattr(transport, "_given_up", False)
    first, second = FakeSocket(b"bbr", {b"bbr"}), FakeSocket(b"bbr", {b"bbr"})
    with caplog.at_level(logging.WARNING, logger="braid.transport"):
        assert restart_congestion_control(first) is False
        assert restart_congestion_control(second) is False
    # The first tunnel is left on reno; no later one is touched (they keep their algorithm).
    assert first.set == [b"reno", b"bbr"] and second.set == []
    warnings = [r for r in caplog.records if "congestion control bbr" in r.getMessage()]
    assert len(warnings) == 1


def test_a_refused_switch_to_reno_puts_the_algorithm_back(monkeypatch) -> None:
    """On MPTCP the switch goes subflow by subflow: when one refuses reno, those already
    switched get their own algorithm back."""
    monkeypatch.setattr(transport, "_given_up", False)
    sock = FakeSocket(b"cubic", {b"reno"})
    assert restart_congestion_control(sock) is False
    assert sock.set == [b"reno", b"cubic"]
