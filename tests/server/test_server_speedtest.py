"""The server's speed-test endpoint: its caps (pure, with a made-up clock), its wire messages,
and the endpoint itself over a socket pair (no network namespace involved)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from braid.protocol.session import Phase, Role, TunnelSession
from braid.protocol.speedtest import (
    Ask,
    Direction,
    Grant,
    Report,
    Status,
    encode_ask,
    encode_grant,
    encode_report,
    parse_ask,
    parse_grant,
    parse_report,
    steady_rate,
)
from braid.protocol.tunnel import FrameDecoder, ProtocolError, Reply, frame_header, parse_reply
from braid.server import speedtest
from braid.server.speedtest import SpeedTests, serve_speedtest

MIB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_oversize_or_overlong_request_is_granted_the_caps() -> None:
    tests = SpeedTests()
    grant, ticket = tests.grant("laptop", Ask(Direction.DOWN, 10 << 30, 3_600_000))
    assert ticket is not None
    assert grant == Grant(Status.GRANTED, speedtest.MAX_BYTES, int(speedtest.MAX_SECONDS * 1000))
    small, _ = tests.grant("laptop", Ask(Direction.UP, 2 * MIB, 1500))
    assert (small.bytes, small.ms) == (2 * MIB, 1500)  # within the caps: as asked


def test_empty_requests_are_refused() -> None:
    tests = SpeedTests()
    assert tests.grant("laptop", Ask(Direction.DOWN, 0, 1000))[0].status is Status.BAD_REQUEST
    assert tests.grant("laptop", Ask(Direction.UP, MIB, 0))[0].status is Status.BAD_REQUEST
    assert tests.running == 0


def test_tests_at_once_are_capped_per_device_and_in_all() -> None:
    tests = SpeedTests(per_device=2, total=3)
    ask = Ask(Direction.DOWN, MIB * 4, 1000)
    first = tests.grant("a", ask)[1]
    assert tests.grant("a", ask)[1] is not None
    assert tests.grant("a", ask)[0].status is Status.BUSY  # a's third
    assert tests.grant("b", ask)[1] is not None
    assert tests.grant("c", ask)[0].status is Status.BUSY  # the server's fourth
    assert first is not None
    tests.finish(first, MIB)
    tests.finish(first, MIB)  # twice changes nothing
    assert tests.running == 2
    assert tests.grant("c", ask)[1] is not None


def test_the_allowance_counts_what_was_moved_and_returns_after_the_window() -> None:
    clock = Clock()
    tests = SpeedTests(allowance=100 * MIB, window=3600, clock=clock)
    # Granted 64 MiB, moved only 10: the 10 count.
    grant, ticket = tests.grant("a", Ask(Direction.DOWN, 64 * MIB, 5000))
    assert grant.bytes == 64 * MIB and ticket is not None
    assert tests.used("a") == 64 * MIB  # reserved while it runs
    tests.finish(ticket, 10 * MIB)
    assert tests.used("a") == 10 * MIB
    clock.now += 600
    grant, ticket = tests.grant("a", Ask(Direction.UP, 200 * MIB, 5000))
    assert grant.bytes == 64 * MIB and ticket is not None  # the per-test cap
    tests.finish(ticket, 64 * MIB)
    clock.now += 600
    grant, ticket = tests.grant("a", Ask(Direction.UP, 200 * MIB, 5000))
    assert grant.bytes == 26 * MIB and ticket is not None  # what is left of the allowance
    tests.finish(ticket, 26 * MIB)
    refused, none = tests.grant("a", Ask(Direction.DOWN, MIB, 1000))
    assert none is None and refused.status is Status.ALLOWANCE
    # The first 10 MiB leave the window 3600 s after they were granted: 2400 s from now.
    assert refused.retry_after == 2400
    assert "about 40 min" in refused.status.describe(refused.retry_after)
    assert tests.grant("b", Ask(Direction.DOWN, MIB, 1000))[1] is not None  # others unaffected
    clock.now += 2400
    assert tests.grant("a", Ask(Direction.DOWN, MIB, 1000))[1] is not None


def test_messages_round_trip_and_garbage_is_refused() -> None:
    ask = Ask(Direction.UP, 123456789, 2500)
    assert parse_ask(encode_ask(ask)) == ask
    grant = Grant(Status.ALLOWANCE, 0, 0, 77)
    assert parse_grant(encode_grant(grant)) == grant
    assert parse_report(encode_report(Report(99, 1500))) == Report(99, 1500)
    for bad in (b"", b"S", encode_ask(ask)[:-1], b"X" + encode_ask(ask)[1:]):
        with pytest.raises(ProtocolError):
            parse_ask(bad)
    with pytest.raises(ProtocolError):
        parse_ask(encode_ask(ask)[:1] + b"\x09" + encode_ask(ask)[2:])  # no such direction


def test_the_steady_rate_leaves_out_the_start() -> None:
    # 1 MB/s, but the first 0.2 s brought a burst of 1 MB.
    samples = [(0.0, 1_000_000)] + [(0.1 * i, 1_000_000 + 100_000 * i) for i in range(1, 31)]
    assert steady_rate(samples) == pytest.approx(1_000_000, rel=0.01)
    # The receiver was busy when it took the first steady sample: it read less than had come.
    late = [*samples[:5], (samples[5][0], samples[5][1] - 150_000), *samples[6:]]
    assert steady_rate(late) == pytest.approx(1_000_000, rel=0.05)
    assert steady_rate(samples[:1]) is None
    assert steady_rate([(1.0, 5), (1.0, 10)]) is None


async def _client(ask: Ask, send_bytes: int = 0) -> tuple[Reply, Grant, int, list[Report]]:
    """Run serve_speedtest on one end of a socket pair and a bare client on the other."""
    ours, theirs = socket.socketpair()
    server_reader, server_writer = await asyncio.open_connection(sock=theirs)
    reader, writer = await asyncio.open_connection(sock=ours)
    session = TunnelSession(Role.SERVER)
    session.phase = Phase.REQUESTED  # HELLO and REQUEST are the session's tests' business
    tests = SpeedTests(max_bytes=2 * MIB, max_seconds=1.0)
    counted: list[tuple[int, int]] = []
    served = asyncio.ensure_future(
        serve_speedtest(
            server_reader,
            server_writer,
            session,
            "laptop",
            tests,
            "test",
            lambda up, down: counted.append((up, down)),
        )
    )
    payload = encode_ask(ask)
    writer.write(frame_header(len(payload)) + payload)
    head = await reader.readexactly(8)  # REPLY: code, then an IPv4 address
    reply = parse_reply(head)
    assert reply is not None
    decoder = FrameDecoder()
    frames: list[bytes] = []

    async def sink() -> None:
        while not decoder.eof:
            data = await reader.read(65536)
            if not data:
                break
            frames.extend(decoder.feed(data))

    async def source() -> None:
        sent = 0
        block = bytes(60000)
        try:
            while sent < send_bytes and not decoder.eof:
                writer.write(frame_header(len(block)) + block)
                sent += len(block)
                await writer.drain()
        except ConnectionError:
            pass

    await asyncio.wait_for(asyncio.gather(sink(), source()), 10)
    await asyncio.wait_for(served, 10)
    writer.close()
    grant = parse_grant(frames[0])
    data = sum(len(frame) for frame in frames[1:]) if ask.direction is Direction.DOWN else 0
    reports = [parse_report(frame) for frame in frames[1:]] if ask.direction is Direction.UP else []
    assert tests.running == 0
    assert sum(up + down for up, down in counted) == (
        data if ask.direction is Direction.DOWN else reports[-1].bytes if reports else 0
    )
    return reply[0].code, grant, data, reports


def test_a_download_stops_at_the_granted_bytes() -> None:
    code, grant, data, _ = asyncio.run(_client(Ask(Direction.DOWN, 50 * MIB, 60_000)))
    assert code is Reply.SUCCEEDED
    assert (grant.status, grant.bytes, grant.ms) == (Status.GRANTED, 2 * MIB, 1000)
    assert data == 2 * MIB


def test_an_upload_is_counted_and_reported_and_cut_at_the_cap() -> None:
    code, grant, _, reports = asyncio.run(
        _client(Ask(Direction.UP, 50 * MIB, 60_000), send_bytes=20 * MIB)
    )
    assert code is Reply.SUCCEEDED and grant.bytes == 2 * MIB
    assert reports, "no report"
    # The server stopped reading at the cap (it may have taken in a frame more).
    assert 2 * MIB <= reports[-1].bytes <= 2 * MIB + 2 * 65536
    assert [r.bytes for r in reports] == sorted(r.bytes for r in reports)


def test_a_garbled_request_gets_a_refusal_not_data() -> None:
    async def run() -> list[bytes]:
        ours, theirs = socket.socketpair()
        server_reader, server_writer = await asyncio.open_connection(sock=theirs)
        reader, writer = await asyncio.open_connection(sock=ours)
        session = TunnelSession(Role.SERVER)
        session.phase = Phase.REQUESTED
        served = asyncio.ensure_future(
            serve_speedtest(
                server_reader, server_writer, session, "x", SpeedTests(), "t", lambda u, d: None
            )
        )
        writer.write(frame_header(3) + b"GET")
        await reader.readexactly(8)
        decoder = FrameDecoder()
        frames: list[bytes] = []
        while not decoder.eof:
            data = await asyncio.wait_for(reader.read(65536), 5)
            if not data:
                break
            frames.extend(decoder.feed(data))
        await asyncio.wait_for(served, 5)
        writer.close()
        return frames

    frames = asyncio.run(run())
    assert [parse_grant(frame).status for frame in frames] == [Status.BAD_REQUEST]
