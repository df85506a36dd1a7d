"""``braid doctor --speed`` against real braidd and braid-server in the test world, four links of
20, 10, 10 and 5 Mbit/s: each link's figures come near its rate, bonded beats the best link, the
run keeps to its time bound (30 s with four links) and shows its progress; the server's endpoint is closed to anyone
without a token and caps what it is asked; not connected is said plainly."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from braid.cli_doctor import render_speed
from braid.netbed import LinkSpec, World
from braid.netbed.stack import BraidStack, wait_for
from braid.protocol.address import Address
from braid.protocol.pairing import parse_pairing
from braid.protocol.speedtest import Ask, Direction, Status, encode_ask, parse_grant
from braid.protocol.tunnel import Command, Reply, encode_hello, encode_request, frame_header
from braid.server import speedtest as caps
from braid.tunnel_client import open_tunnel

pytestmark = pytest.mark.netns

LINKS = [
    LinkSpec("eth0", "ethernet", rate_mbit=20, rtt_ms=10),
    LinkSpec("wlan0", "wifi", rate_mbit=10, rtt_ms=20),
    LinkSpec("usb0", "cellular", rate_mbit=10, rtt_ms=30),
    LinkSpec("usb1", "cellular", rate_mbit=5, rtt_ms=40),
]
RATES = {link.name: link.rate_mbit for link in LINKS}
#: The whole run's bound (braid.daemon.speed.TIME_LIMIT) and a little for the command itself.
BOUND = 30 + 3


@pytest.fixture(scope="module")
def stack(world: World) -> Iterator[BraidStack]:
    with BraidStack(world, links=[f"{link.name}:{link.kind}:always" for link in LINKS]) as braid:
        assert wait_for(lambda: all(link["alive"] for link in braid.status()["links"]), 10)
        yield braid


def braid(stack: BraidStack, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "braid.cli", "--control", str(stack.control_path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_each_link_near_its_rate_and_bonded_above_the_best(stack: BraidStack) -> None:
    started = time.monotonic()
    done = braid(stack, "doctor", "--speed", "--json")
    elapsed = time.monotonic() - started
    print(done.stdout, done.stderr)
    assert done.returncode == 0, done.stderr
    assert elapsed < BOUND, f"the speed test took {elapsed:.1f} s"
    result = json.loads(done.stdout)
    print(render_speed(result))
    links = {entry["name"]: entry for entry in result["links"]}
    for name, rate in RATES.items():
        entry = links[name]
        assert entry["error"] is None and entry["skipped"] is None, entry
        for direction in ("down", "up"):
            measured = entry[f"{direction}_mbps"]
            assert 0.6 * rate <= measured <= 1.1 * rate, (name, direction, measured, rate)
        # The probes' round trip idle and with the link full: the queue its ISP builds.
        assert entry["rtt_idle_ms"] is not None and entry["rtt_down_ms"] is not None, entry
        assert entry["rtt_down_ms"] > entry["rtt_idle_ms"], entry
    bonded = result["bonded"]
    assert sorted(bonded["links"]) == sorted(RATES), bonded
    for direction in ("down", "up"):
        best = max(links[name][f"{direction}_mbps"] for name in RATES)
        assert bonded[f"{direction}_mbps"] > best, (direction, bonded, best)
        assert bonded[f"{direction}_mbps"] <= 1.1 * sum(RATES.values()), bonded
    # Bounded in volume too: what the links can carry in the time asked, no more.
    assert result["bytes"] <= 1.1 * 2 * sum(RATES.values()) * 2 * result["seconds"] * 1e6 / 8
    # The progress came as the test went, one line per step (stderr is not a terminal here).
    steps = [line for line in done.stderr.splitlines() if line.startswith("[")]
    assert len(steps) == 10 and steps[0].startswith("[1/10] eth0: download"), done.stderr
    assert steps[-1].startswith("[10/10] all links bonded: upload"), done.stderr
    text = render_speed(result)
    assert f"eth0: down {links['eth0']['down_mbps']:.1f} Mbit/s, up " in text
    assert " ms idle, " in text and " ms downloading" in text
    assert "all links bonded: down " in text


async def _unauthenticated(server: tuple[str, int], hello: bytes) -> bytes:
    """What the server sends to a client that asks for a speed test after ``hello``."""
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(*server, ssl=tls, server_hostname="")
    ask = encode_ask(Ask(Direction.DOWN, 1 << 20, 1000))
    request = encode_request(Command.SPEEDTEST, Address("0.0.0.0", 0))
    writer.write(hello + request + frame_header(len(ask)) + ask)
    await writer.drain()
    got = b""
    try:
        async with asyncio.timeout(8):
            while chunk := await reader.read(65536):
                got += chunk
    except (ConnectionError, ssl.SSLError):
        pass
    writer.transport.abort()
    return got


def test_no_token_no_speed_test(world: World, stack: BraidStack) -> None:
    server = (world.server_v4, stack.server_port)
    with world.enter("laptop"):
        wrong = asyncio.run(_unauthenticated(server, encode_hello("not-the-token")))
        none = asyncio.run(_unauthenticated(server, b""))
    # Dropped without a byte: no AUTH_OK, no REPLY, no data.
    assert wrong == b"" and none == b""
    assert "wrong token" in stack.server_log.read_text()


async def _ask(uri: str, address: str, ask: Ask) -> tuple[Reply, object]:
    tunnel = await open_tunnel(parse_pairing(uri), addresses=[address], timeout=5)
    try:
        tunnel.send_request(Address("0.0.0.0", 0), Command.SPEEDTEST)
        tunnel.writer.write(tunnel.session.send_data(encode_ask(ask)))
        reply = await tunnel.read_reply(Address("0.0.0.0", 0), timeout=5)
        grant = parse_grant(await tunnel.receive_datagram() or b"")
        return reply.code, grant
    finally:
        await tunnel.close(abort=True)


def test_an_oversize_request_is_capped(world: World, stack: BraidStack) -> None:
    assert stack.pairing_uri is not None
    with world.enter("laptop"):
        code, grant = asyncio.run(
            _ask(stack.pairing_uri, world.server_v4, Ask(Direction.DOWN, 10 << 30, 600_000))
        )
        bad_code, bad = asyncio.run(
            _ask(stack.pairing_uri, world.server_v4, Ask(Direction.UP, 0, 1000))
        )
    assert code is Reply.SUCCEEDED
    assert grant.status is Status.GRANTED, grant
    assert grant.bytes == caps.MAX_BYTES and grant.ms == int(caps.MAX_SECONDS * 1000), grant
    assert bad_code is Reply.SUCCEEDED and bad.status is Status.BAD_REQUEST, bad


def test_not_connected_is_said(stack: BraidStack) -> None:
    stack.call("down")
    try:
        done = braid(stack, "doctor", "--speed")
        assert done.returncode != 0
        assert "not connected" in done.stderr, done.stderr
    finally:
        stack.up()
