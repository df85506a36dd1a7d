"""braidd's side of the speed test without a network: the transfer against the server's real
endpoint over a socket pair, an old server and a refusal said plainly, and the time per
transfer that keeps the whole run within its bound."""

from __future__ import annotations

import asyncio
import socket

import pytest

from braid.daemon import speed
from braid.daemon.speed import SpeedTestRefused, measure, seconds_each
from braid.protocol.session import Phase, Role, TunnelSession
from braid.protocol.speedtest import Direction
from braid.protocol.tunnel import Reply, encode_reply
from braid.server.speedtest import SpeedTests, serve_speedtest
from braid.tunnel_client import Tunnel


async def _pair(server) -> Tunnel:
    """A client Tunnel (authenticated) whose other end runs ``server(reader, writer)``."""
    ours, theirs = socket.socketpair()
    server_reader, server_writer = await asyncio.open_connection(sock=theirs)
    reader, writer = await asyncio.open_connection(sock=ours)
    session = TunnelSession(Role.CLIENT)
    session.phase = Phase.READY  # as open_tunnel leaves it
    tunnel = Tunnel(reader, writer, ours, "server.example:7443", session)
    tunnel.served = asyncio.ensure_future(server(server_reader, server_writer))  # type: ignore[attr-defined]
    return tunnel


def _endpoint(tests: SpeedTests):
    async def server(reader, writer) -> None:
        session = TunnelSession(Role.SERVER)
        session.phase = Phase.READY
        while session.phase is Phase.READY:
            session.receive(await reader.read(1))
        await serve_speedtest(reader, writer, session, "laptop", tests, "test", lambda u, d: None)

    return server


@pytest.mark.parametrize("direction", [Direction.DOWN, Direction.UP])
def test_a_transfer_is_timed_by_its_receiver_and_ends_at_the_servers_cap(
    direction: Direction,
) -> None:
    """A socket pair is faster than any link: the server's byte cap ends the transfer."""
    cap = 8 << 20

    async def run():
        tests = SpeedTests(max_bytes=cap)
        tunnel = await _pair(_endpoint(tests))
        measured = await measure(tunnel, direction, 1.0)
        await asyncio.wait_for(tunnel.served, 5)  # type: ignore[attr-defined]
        return measured, tests

    measured, tests = asyncio.run(run())
    assert measured.bps is not None and measured.bps > 0
    assert cap <= measured.bytes <= cap + 2 * 65536, measured
    assert measured.seconds < 1.0, measured
    assert tests.running == 0


def test_an_old_server_is_named_too_old() -> None:
    async def old_server(reader, writer) -> None:
        await reader.read(1)  # the REQUEST's command: one it does not know
        writer.write(encode_reply(Reply.COMMAND_NOT_SUPPORTED))
        await writer.drain()
        writer.close()

    async def run() -> None:
        tunnel = await _pair(old_server)
        await measure(tunnel, Direction.DOWN, 1.0)

    with pytest.raises(SpeedTestRefused, match="too old for a speed test"):
        asyncio.run(run())


def test_a_refusal_says_why() -> None:
    async def run() -> None:
        tunnel = await _pair(_endpoint(SpeedTests(per_device=0)))
        await measure(tunnel, Direction.UP, 1.0)

    with pytest.raises(SpeedTestRefused, match="as many speed tests as it allows"):
        asyncio.run(run())


def test_transfers_shorten_so_that_many_links_fit_the_bound() -> None:
    assert seconds_each(3) == speed.DEFAULT_SECONDS  # two links and the bonded test
    assert seconds_each(5) == 2.4  # four links: 10 transfers in 24 s
    assert seconds_each(3, asked=1.0) == 1.0
    assert seconds_each(2, asked=60) == speed.MAX_SECONDS
    assert seconds_each(100) == speed.MIN_SECONDS
    for tests in range(1, 6):
        assert 2 * tests * seconds_each(tests) <= speed.TRANSFER_TIME < speed.TIME_LIMIT
