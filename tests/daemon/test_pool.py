"""The tunnel pool connects to the addresses braidd resolved, and reports every failure."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from braid.daemon.tunnel.pool import TunnelPool
from braid.protocol.pairing import Pairing
from braid.tunnel_client import TunnelError


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed


def test_the_pool_never_looks_the_name_up_again_and_reports_the_failure() -> None:
    """System-wide mode with a server name wedged: every tunnel looked the name up, the lookup
    was captured and needed a tunnel; and the failure left `connected` true."""
    pairing = Pairing("braid-server.invalid", closed_port(), "ab" * 32, "T" * 43)
    changes = []

    async def scenario() -> None:
        pool = TunnelPool(
            pairing,
            lambda family: None,
            0,
            on_change=lambda: changes.append(1),
            addresses=["127.0.0.1"],
        )
        pool.connected = True  # as if it had reached the server before
        with pytest.raises(TunnelError) as caught:
            await pool._open()
        assert "resolve" not in str(caught.value)
        assert "connection refused" in str(caught.value)  # it did try the address
        assert not pool.connected and pool.last_error and changes

    asyncio.run(scenario())


def test_without_addresses_a_failed_lookup_is_a_failure_too() -> None:
    pairing = Pairing("braid-server.invalid", 7443, "ab" * 32, "T" * 43)

    async def scenario() -> None:
        pool = TunnelPool(pairing, lambda family: None, 0)
        pool.connected = True
        with pytest.raises(TunnelError, match="cannot resolve"):
            await pool._open()
        assert not pool.connected and "cannot resolve" in pool.last_error

    asyncio.run(scenario())


def test_resize_closes_the_surplus_at_once() -> None:
    pairing = Pairing("braid-server.invalid", 7443, "ab" * 32, "T" * 43)

    class Ready:
        closed = False

        async def close(self) -> None:
            self.closed = True

    async def scenario() -> None:
        pool = TunnelPool(pairing, lambda family: None, 4)
        tunnels = [Ready() for _ in range(4)]
        pool._ready = list(tunnels)
        pool.resize(1)
        await asyncio.sleep(0.01)
        assert pool.size == 1 and pool.ready_count == 1
        assert sum(t.closed for t in tunnels) == 3

    asyncio.run(scenario())


def test_a_tunnel_that_waited_in_the_pool_restarts_its_congestion_control(monkeypatch) -> None:
    """BBR would enter PROBE_RTT (a window of 4 packets for 200 ms) on a tunnel that sat idle
    for 10 s since its handshake; a tunnel taken at once is left as it is."""
    from braid.daemon.tunnel import pool as pool_module

    restarted: list[object] = []
    monkeypatch.setattr(
        pool_module, "restart_congestion_control", lambda sock: restarted.append(sock) or True
    )
    pairing = Pairing("braid-server.invalid", 7443, "ab" * 32, "T" * 43)

    class Ready:
        def __init__(self, age: float) -> None:
            self.sock = object()
            self.created = time.monotonic() - age
            self.local = ("198.18.1.2", 40000)

        def is_alive(self) -> bool:
            return True

    async def scenario() -> None:
        pool = TunnelPool(pairing, lambda family: None, 0)
        idle, fresh = Ready(age=30.0), Ready(age=0.0)
        pool._ready = [idle, fresh]  # take() hands out the oldest first
        assert await pool.take() is idle
        assert restarted == [idle.sock]
        assert await pool.take() is fresh
        assert restarted == [idle.sock]

    asyncio.run(scenario())
