"""The stall guard: spots a tunnel socket the kernel has wedged and gives it a larger buffer.

The wedge itself (Linux 6.18 leaving an MPTCP connection with a receive buffer full of
out-of-order data) comes from timing, so it cannot be made to order; the load test in
test_reliability_e2e.py, 500 concurrent downloads, is where the guard meets it. Here the
signature is fed in and what the guard does with it is checked on real sockets.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Iterator

import pytest

from braid import stall
from braid.stall import (
    StallGuard,
    autotune_max,
    fix_receive_buffer,
    grow_receive_buffer,
    is_stalled,
    receive_memory,
    rmem_max,
)
from braid.transport import IPPROTO_MPTCP


def loopback_listener() -> socket.socket:
    """An MPTCP listener on loopback (plain TCP where the kernel has no MPTCP)."""
    try:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    except OSError:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    return listener


@pytest.fixture
def connection() -> Iterator[tuple[socket.socket, socket.socket]]:
    """An MPTCP connection over loopback (plain TCP where the kernel has no MPTCP)."""
    with loopback_listener() as listener:
        client = socket.socket(listener.family, socket.SOCK_STREAM, listener.proto)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
    with client, server:
        yield client, server


def test_only_a_full_buffer_with_nothing_readable_is_a_stall() -> None:
    assert is_stalled(rmem=131328, rcvbuf=131072, readable=False)
    assert is_stalled(rmem=131072, rcvbuf=131072, readable=False)
    assert not is_stalled(rmem=131328, rcvbuf=131072, readable=True)  # a slow reader, not a stall
    assert not is_stalled(rmem=90000, rcvbuf=131072, readable=False)  # room for the missing data
    assert not is_stalled(rmem=0, rcvbuf=0, readable=False)


def test_receive_memory_reads_the_kernels_figures_and_consumes_nothing(connection) -> None:
    client, server = connection
    assert receive_memory(client)[2] is False
    server.sendall(b"x" * 10000)
    deadline = time.monotonic() + 5
    while not receive_memory(client)[2] and time.monotonic() < deadline:
        time.sleep(0.01)
    rmem, rcvbuf, readable = receive_memory(client)
    assert readable
    assert rmem >= 10000  # what the queued data costs the kernel, overhead included
    assert rcvbuf == client.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    received = b""
    while len(received) < 10000:
        received += client.recv(65536)
    assert received == b"x" * 10000


def test_growing_the_buffer_returns_what_the_kernel_granted(connection) -> None:
    client, _ = connection
    granted = grow_receive_buffer(client, 8 << 20)
    assert granted == client.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if os.geteuid() == 0:
        assert granted == 8 << 20  # SO_RCVBUFFORCE goes past net.core.rmem_max
    else:
        assert granted > 0


def test_the_autotuning_ceiling_is_the_third_field_of_tcp_rmem(tmp_path) -> None:
    path = tmp_path / "tcp_rmem"
    path.write_text("4096\t131072\t33554432\n")
    assert autotune_max(str(path)) == 33554432
    path.write_text("garbage\n")
    assert autotune_max(str(path)) == stall.AUTOTUNE_MAX_DEFAULT
    assert autotune_max(str(tmp_path / "missing")) == stall.AUTOTUNE_MAX_DEFAULT


def wedged(rcvbuf_of: socket.socket):
    """receive_memory as the kernel reports a wedged socket: full, nothing readable."""

    def report(sock: socket.socket) -> tuple[int, int, int]:
        rcvbuf = rcvbuf_of.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        return rcvbuf + 256, rcvbuf, False

    return report


def test_a_wedged_socket_seen_twice_gets_the_autotuning_ceiling(
    connection, monkeypatch, caplog
) -> None:
    client, _ = connection
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    before = client.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    monkeypatch.setattr(stall, "receive_memory", wedged(client))
    monkeypatch.setattr(stall, "autotune_max", lambda: 4 << 20)
    guard = StallGuard()

    async def scenario() -> list[int]:
        with guard.watching(client, "flow to 198.18.0.9:80"):
            return [guard.sweep(), guard.sweep()]

    caplog.set_level(logging.INFO, logger="braid.stall")
    assert asyncio.run(scenario()) == [0, 1]  # once could be a moment; twice is a wedge
    grown = client.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    assert grown > before
    if os.geteuid() == 0:
        assert grown == 4 << 20
    assert guard.freed == 1
    assert "flow to 198.18.0.9:80" in caplog.text
    assert f"raised from {before >> 10} to {grown >> 10} KiB" in caplog.text


def test_a_buffer_that_cannot_grow_is_reported_once_and_left_alone(
    connection, monkeypatch, caplog
) -> None:
    client, _ = connection
    monkeypatch.setattr(stall, "receive_memory", wedged(client))
    # What an unprivileged process meets at net.core.rmem_max: the kernel grants no more.
    monkeypatch.setattr(
        stall,
        "grow_receive_buffer",
        lambda sock, want: sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
    )
    guard = StallGuard()

    async def scenario() -> list[int]:
        with guard.watching(client, "flow one"), guard.watching(client, "flow two"):
            return [guard.sweep() for _ in range(6)]

    caplog.set_level(logging.INFO, logger="braid.stall")
    assert asyncio.run(scenario()) == [0] * 6
    assert guard.freed == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "net.core.rmem_max" in warnings[0].getMessage()


def test_the_sweeper_runs_while_sockets_are_watched_and_then_ends(connection) -> None:
    client, _ = connection
    guard = StallGuard(interval=0.01)

    async def scenario() -> asyncio.Task:
        with guard.watching(client, "flow"):
            task = guard._task
            assert task is not None and not task.done()
            await asyncio.sleep(0.05)
        await asyncio.wait_for(task, 1)  # nothing watched any more: it ends by itself
        return task

    assert asyncio.run(scenario()).done()
    # A second event loop (as after a restart in tests) gets a sweeper of its own.
    assert asyncio.run(scenario()).done()


def test_a_stream_without_a_socket_is_not_watched() -> None:
    guard = StallGuard()

    async def scenario() -> None:
        with guard.watching(None, "flow"):
            assert guard._task is None

    asyncio.run(scenario())


class _Unprivileged:
    """A socket as a process without CAP_NET_ADMIN sees it: SO_RCVBUFFORCE is refused."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def setsockopt(self, level: int, name: int, value: int) -> None:
        if name == stall.SO_RCVBUFFORCE:
            raise PermissionError(1, "Operation not permitted")
        self.sock.setsockopt(level, name, value)


def test_a_tunnel_socket_gets_a_fixed_large_receive_buffer(connection) -> None:
    client, _ = connection
    want = stall.TUNNEL_RCVBUF
    privileged = os.geteuid() == 0
    assert fix_receive_buffer(client) == (privileged or rmem_max() >= want // 2)
    if privileged:  # past net.core.rmem_max, as braidd does
        assert client.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == want
    # Unprivileged (braid-server) where net.core.rmem_max allows the size: the plain option.
    allowed = 2 * rmem_max()
    other = socket.socket()
    with other:
        assert fix_receive_buffer(_Unprivileged(other), want=allowed)
        assert other.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == allowed


def test_a_buffer_that_would_be_smaller_than_autotuning_allows_is_not_fixed(
    connection, monkeypatch
) -> None:
    client, _ = connection
    before = client.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    monkeypatch.setattr(stall, "rmem_max", lambda: 212992)  # Debian's default
    assert not fix_receive_buffer(_Unprivileged(client))
    assert client.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == before  # still autotuning
    assert fix_receive_buffer(None)  # nothing to fix, nothing to warn about


def test_rmem_max_is_read_from_proc(tmp_path) -> None:
    path = tmp_path / "rmem_max"
    path.write_text("4194304\n")
    assert rmem_max(str(path)) == 4194304
    assert rmem_max(str(tmp_path / "missing")) == 0


def test_braidd_connects_its_tunnels_with_the_fixed_buffer() -> None:
    """The buffer is set before the SYN, on every tunnel braidd opens (tunnel_client)."""
    from braid.tunnel_client import _connect

    with loopback_listener() as listener:

        async def connect() -> socket.socket:
            loop = asyncio.get_running_loop()
            candidates = [(socket.AF_INET, listener.getsockname())]
            return await _connect(candidates, "test", loop.time() + 5, None, None, True)

        sock = asyncio.run(connect())
        with sock:
            granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if os.geteuid() == 0 or rmem_max() >= stall.TUNNEL_RCVBUF // 2:
        assert granted == stall.TUNNEL_RCVBUF
    else:
        assert granted < stall.TUNNEL_RCVBUF  # left to autotuning
