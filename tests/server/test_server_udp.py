"""Command.UDP end to end: braid-server as a real process in a throwaway namespace.

The namespace holds the server (198.18.100.1), a UDP echo service on
198.18.200.1 and [2001:db8:200::1] (allowed by the test policy, since they
are the server's own addresses here), and the test's client code, run by a
thread that entered the namespace. ``timeouts.udp_idle`` is 1 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from server_netns import Netns, NetnsLoop, ServerProcess, init_state

from braid.protocol.address import Address, encode_address
from braid.protocol.pairing import Pairing
from braid.protocol.tunnel import Command, Reply, parse_reply
from braid.server.server import UDP_IDLE, udp_idle_timeout
from braid.server.state import Device, ServerConfig, StateDir, StateError, hash_token
from braid.tunnel_client import Tunnel, open_tunnel

pytestmark = pytest.mark.timeout(60)
netns = pytest.mark.netns

SERVER_V4 = "198.18.100.1"
TARGET_V4 = "198.18.200.1"
TARGET_V6 = "2001:db8:200::1"
TARGET_NAME = "target.braid.test"
PORT = 7443
ECHO_PORT = 9100
CLOSED_PORT = 9101  # nothing listens: the kernel answers with ICMP port unreachable
UDP_IDLE_TEST = 1.0


# --- udp_idle in server.json, no network ------------------------------------------------


def _state(tmp_path: Path, timeouts: dict | None) -> tuple[ServerConfig, StateDir]:
    state = StateDir(tmp_path)
    config = ServerConfig("192.0.2.1", 7443, "192.0.2.1", [Device("laptop", hash_token("a" * 43))])
    data = config.to_json()
    if timeouts is not None:
        data["timeouts"] = timeouts
    state.config_path.write_text(json.dumps(data))
    return state.load(), state


def test_udp_idle_defaults_when_absent(tmp_path: Path) -> None:
    assert udp_idle_timeout(*_state(tmp_path, None)) == UDP_IDLE == 120.0
    assert udp_idle_timeout(*_state(tmp_path, {"idle": 5})) == UDP_IDLE
    config, _ = _state(tmp_path, None)
    assert udp_idle_timeout(config, None) == UDP_IDLE


def test_udp_idle_is_read_from_server_json(tmp_path: Path) -> None:
    config, state = _state(tmp_path, {"idle": 5, "udp_idle": 7})
    assert config.timeouts.idle == 5  # the rest of the file loads as before
    assert udp_idle_timeout(config, state) == 7.0


@pytest.mark.parametrize("value", [0, -1, "60", True])
def test_bad_udp_idle_is_one_clear_error(tmp_path: Path, value: object) -> None:
    with pytest.raises(StateError, match=r"timeouts\.udp_idle must be a positive number"):
        udp_idle_timeout(*_state(tmp_path, {"udp_idle": value}))


# --- end to end -----------------------------------------------------------------------------


@dataclass
class World:
    netns: Netns
    loop: NetnsLoop
    server: ServerProcess
    pairing: Pairing

    def run(self, coro, timeout: float = 20):
        return self.loop.run(coro, timeout)


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.transport.sendto(data, addr)


async def _start_echo() -> list[asyncio.BaseTransport]:
    loop = asyncio.get_running_loop()
    out = []
    for host in (TARGET_V4, TARGET_V6):
        transport, _ = await loop.create_datagram_endpoint(_Echo, local_addr=(host, ECHO_PORT))
        out.append(transport)
    return out


async def _close(transports: list[asyncio.BaseTransport]) -> None:
    for transport in transports:
        transport.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("braid-server-udp")
    ns = Netns(f"brdudp{os.getpid()}")
    ns.create()
    loop: NetnsLoop | None = None
    server: ServerProcess | None = None
    echo: list[asyncio.BaseTransport] = []
    try:
        ns.veth((SERVER_V4, TARGET_V4), (TARGET_V6,))
        ns.write_etc(
            "hosts",
            f"127.0.0.1 localhost\n::1 localhost\n{TARGET_V4} {TARGET_NAME}\n"
            f"{TARGET_V6} {TARGET_NAME}\n",
        )
        ns.write_etc("resolv.conf", "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        state_dir = tmp / "state"
        pairing = init_state(
            state_dir,
            f"{SERVER_V4}:{PORT}",
            policy={"allow": [f"{TARGET_V4}/32", f"{TARGET_V6}/128"], "deny": []},
            timeouts={"handshake": 5, "idle": 30, "connect": 3, "udp_idle": UDP_IDLE_TEST},
        )
        loop = NetnsLoop(ns)
        echo = loop.run(_start_echo())
        server = ServerProcess(ns, state_dir, tmp / "server.log").start()
        yield World(ns, loop, server, pairing)
    finally:
        rc = server.stop() if server else None
        if loop:
            loop.run(_close(echo))
            loop.close()
        ns.delete()
        if server:
            print(server.log())
    assert rc == 0, "braid-server did not exit cleanly on SIGTERM"


async def _open_udp(pairing: Pairing, address: Address) -> tuple[Tunnel, Reply, Address]:
    tunnel = await open_tunnel(pairing)
    reply = await tunnel.request(address, Command.UDP)
    return tunnel, reply.code, reply.address


async def _receive(tunnel: Tunnel, timeout: float = 5) -> bytes | None:
    return await asyncio.wait_for(tunnel.receive_datagram(), timeout)


@netns
@pytest.mark.parametrize(
    ("host", "expected"),
    [(TARGET_V4, {TARGET_V4}), (TARGET_V6, {TARGET_V6}), (TARGET_NAME, {TARGET_V4, TARGET_V6})],
)
def test_datagrams_are_echoed_one_frame_each(world: World, host: str, expected: set) -> None:
    sizes = [1, 2, 12, 100, 512, 513, 999, 1200, 1399, 1400] * 2
    datagrams = [os.urandom(size) for size in sizes]

    async def scenario() -> tuple[Reply, Address, list[bytes], bytes | None]:
        tunnel, code, bound = await _open_udp(world.pairing, Address(host, ECHO_PORT))
        try:
            for datagram in datagrams:
                await tunnel.send_datagram(datagram)
            echoed = [await _receive(tunnel) for _ in datagrams]
            await tunnel.end_datagrams()
            return code, bound, echoed, await _receive(tunnel)  # type: ignore[return-value]
        finally:
            await tunnel.close()

    code, bound, echoed, end = world.run(scenario())
    assert code == Reply.SUCCEEDED
    assert bound.host in expected and bound.port == ECHO_PORT
    assert sorted(echoed) == sorted(datagrams)  # each datagram whole, none merged or split
    assert end is None  # the server answered our end with its own


@netns
@pytest.mark.parametrize(
    "host", ["127.0.0.1", "::1", "::ffff:127.0.0.1", "169.254.169.254", SERVER_V4]
)
def test_refused_destinations(world: World, host: str) -> None:
    async def scenario() -> Reply:
        tunnel, code, _ = await _open_udp(world.pairing, Address(host, 53))
        await tunnel.close()
        return code

    assert world.run(scenario()) == Reply.NOT_ALLOWED
    world.server.wait_for_log(" refused ")


@netns
def test_unknown_name_is_host_unreachable(world: World) -> None:
    async def scenario() -> Reply:
        tunnel, code, _ = await _open_udp(world.pairing, Address("nowhere.invalid", 53))
        await tunnel.close()
        return code

    assert world.run(scenario()) == Reply.HOST_UNREACHABLE


@netns
def test_icmp_errors_do_not_end_the_session(world: World) -> None:
    async def scenario() -> tuple[Reply, bool, bytes | None]:
        tunnel, code, _ = await _open_udp(world.pairing, Address(TARGET_V4, CLOSED_PORT))
        try:
            for i in range(5):  # each draws a port unreachable, reported to the next call
                await tunnel.send_datagram(b"anyone there? %d" % i)
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            alive = tunnel.is_alive()
            await tunnel.end_datagrams()
            return code, alive, await _receive(tunnel)
        finally:
            await tunnel.close()

    code, alive, end = world.run(scenario())
    assert code == Reply.SUCCEEDED
    assert alive
    assert end is None  # a clean end-of-stream frame, not a broken tunnel


@netns
def test_idle_session_ends_with_an_end_of_stream_frame(world: World) -> None:
    async def scenario() -> tuple[bytes | None, bytes | None, float]:
        tunnel, code, _ = await _open_udp(world.pairing, Address(TARGET_V4, ECHO_PORT))
        assert code == Reply.SUCCEEDED
        try:
            await tunnel.send_datagram(b"ping")
            echoed = await _receive(tunnel)
            started = time.monotonic()
            end = await _receive(tunnel, UDP_IDLE_TEST + 5)
            return echoed, end, time.monotonic() - started
        finally:
            await tunnel.close()

    echoed, end, waited = world.run(scenario())
    assert echoed == b"ping"
    assert end is None
    assert UDP_IDLE_TEST - 0.3 < waited < UDP_IDLE_TEST + 2
    world.server.wait_for_log(f"UDP to {TARGET_V4}:{ECHO_PORT} ended (idle)")


@netns
def test_other_commands_are_not_supported(world: World) -> None:
    async def scenario() -> Reply:
        tunnel = await open_tunnel(world.pairing)
        try:
            # Past the client's session, which has no such command: raw bytes.
            tunnel.writer.write(b"\x02" + encode_address(Address(TARGET_V4, ECHO_PORT)))
            answer = await asyncio.wait_for(tunnel.reader.read(), 5)  # the REPLY, then the close
            parsed = parse_reply(answer)
            assert parsed is not None and parsed[1] == len(answer)
            return parsed[0].code
        finally:
            await tunnel.close()

    assert world.run(scenario()) == Reply.COMMAND_NOT_SUPPORTED


@netns
def test_datagrams_are_counted_in_the_stats(world: World) -> None:
    async def scenario() -> None:
        tunnel, code, _ = await _open_udp(world.pairing, Address(TARGET_V4, ECHO_PORT))
        assert code == Reply.SUCCEEDED
        try:
            for _ in range(3):
                await tunnel.send_datagram(b"x" * 10)
                assert await _receive(tunnel) == b"x" * 10
            await tunnel.end_datagrams()
            assert await _receive(tunnel) is None
        finally:
            await tunnel.close()

    world.run(scenario())
    assert world.server.proc is not None
    world.server.proc.send_signal(signal.SIGUSR1)
    line = world.server.wait_for_log("datagrams down").splitlines()
    stats = [entry for entry in line if "stats:" in entry][-1]
    up = int(stats.split(" datagrams up")[0].rsplit(" ", 1)[1])
    down = int(stats.split(" datagrams down")[0].rsplit(" ", 1)[1])
    assert up >= 3 and down >= 3
