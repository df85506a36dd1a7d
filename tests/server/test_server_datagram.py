"""The datagram path at braid-server: a real server process in a throwaway namespace.

A session is granted over an authenticated tunnel; sealed datagrams then go to the server's UDP
port (the probes' port) and are relayed to a UDP echo that counts what it gets. Forged,
replayed and duplicated packets must never reach the destination or draw an answer.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from server_netns import Netns, NetnsLoop, ServerProcess, init_state

from braid.protocol import datagram as dg
from braid.protocol.address import Address
from braid.protocol.pairing import Pairing
from braid.protocol.tunnel import Command, Reply
from braid.tunnel_client import Tunnel, open_tunnel

pytestmark = [pytest.mark.timeout(60), pytest.mark.netns]

SERVER_V4 = "198.18.100.1"
SERVER_V6 = "2001:db8:100::1"
TARGET_V4 = "198.18.200.1"
TARGET_V6 = "2001:db8:200::1"
PORT = 7443
ECHO_PORT = 9100


class _Echo(asyncio.DatagramProtocol):
    def __init__(self, seen: collections.Counter) -> None:
        self.seen = seen

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.seen[data] += 1
        self.transport.sendto(data, addr)


@dataclass
class World:
    netns: Netns
    loop: NetnsLoop
    server: ServerProcess
    pairing: Pairing
    seen: collections.Counter

    def run(self, coro, timeout: float = 20):
        return self.loop.run(coro, timeout)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("braid-server-datagram")
    ns = Netns(f"brddg{os.getpid()}")
    ns.create()
    loop: NetnsLoop | None = None
    server: ServerProcess | None = None
    transports: list[asyncio.BaseTransport] = []
    seen: collections.Counter = collections.Counter()
    try:
        ns.veth((SERVER_V4, TARGET_V4), (SERVER_V6, TARGET_V6))
        ns.write_etc("hosts", "127.0.0.1 localhost\n::1 localhost\n")
        state_dir = tmp / "state"
        pairing = init_state(
            state_dir,
            f"[::]:{PORT}",
            SERVER_V4,
            policy={"allow": [f"{TARGET_V4}/32", f"{TARGET_V6}/128"], "deny": []},
            timeouts={"handshake": 5, "idle": 30, "connect": 3, "udp_idle": 5},
        )
        pairing = Pairing(SERVER_V4, PORT, pairing.fingerprint, pairing.token)
        loop = NetnsLoop(ns)

        async def start_echo() -> None:
            for host in (TARGET_V4, TARGET_V6):
                transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                    lambda: _Echo(seen), local_addr=(host, ECHO_PORT)
                )
                transports.append(transport)

        loop.run(start_echo())
        server = ServerProcess(ns, state_dir, tmp / "server.log").start()
        yield World(ns, loop, server, pairing, seen)
    finally:
        rc = server.stop() if server else None
        if loop:

            async def close() -> None:
                for transport in transports:
                    transport.close()

            loop.run(close())
            loop.close()
        ns.delete()
        if server:
            print(server.log())
    assert rc == 0, "braid-server did not exit cleanly on SIGTERM"


class Client:
    """A datagram session by hand: the grant over a tunnel, then a UDP socket."""

    def __init__(self, tunnel: Tunnel, grant: tuple[bytes, bytes], server: tuple[str, int]) -> None:
        self.tunnel = tunnel
        self.sealer = dg.Sealer(*grant, dg.UP)
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect(server)
        self.number = 0

    @classmethod
    async def open(cls, pairing: Pairing, server: str = SERVER_V4) -> Client:
        tunnel = await open_tunnel(pairing)
        reply = await tunnel.request(Address("0.0.0.0", 0), Command.DATAGRAM)
        assert reply.code is Reply.SUCCEEDED
        grant = dg.unpack_grant(await asyncio.wait_for(tunnel.receive_datagram(), 5))
        assert grant is not None
        return cls(tunnel, grant, (server, PORT))

    def data(self, payload: bytes, target: str = TARGET_V4, link: int = 0, number=None) -> bytes:
        if number is None:
            self.number += 1
            number = self.number
        packet = dg.Packet(
            dg.Kind.DATA,
            link,
            1 << link,
            dg.stamp_us(time.monotonic_ns()),
            0,
            0,
            1,
            number,
            Address(target, ECHO_PORT),
            payload,
        )
        return self.sealer.seal(packet)

    async def answers(self, wait: float = 0.5) -> list[bytes]:
        loop = asyncio.get_running_loop()
        out = []
        deadline = loop.time() + wait
        while loop.time() < deadline:
            try:
                out.append(self.sock.recv(65535))
            except BlockingIOError:
                await asyncio.sleep(0.01)
        return out

    async def close(self) -> None:
        self.sock.close()
        await self.tunnel.close()


@pytest.fixture
def client(world: World) -> Iterator[Client]:
    c = world.run(Client.open(world.pairing))
    yield c
    world.run(c.close())


def test_a_datagram_is_relayed_and_answered_on_its_link(world: World, client: Client) -> None:
    payload = b"hello " + os.urandom(8)

    async def scenario():
        client.sock.send(client.data(payload))
        return await client.answers()

    answers = world.run(scenario())
    assert world.seen[payload] == 1
    assert len(answers) == 1
    _, packet = client.sealer.open(answers[0])
    assert (packet.kind, packet.link, packet.payload) == (dg.Kind.DATA, 0, payload)
    assert packet.echo != 0  # our stamp, echoed for the link's round trip


def test_replayed_and_forged_datagrams_are_dropped(world: World, client: Client) -> None:
    payload = b"once " + os.urandom(8)

    async def scenario():
        sealed = client.data(payload)
        for _ in range(5):
            client.sock.send(sealed)  # a replay: the same bytes again
        forged = bytearray(client.data(b"forged " + os.urandom(8)))
        forged[-1] ^= 1
        client.sock.send(bytes(forged))
        stranger = dg.Sealer(os.urandom(8), os.urandom(32), dg.UP)  # no such session
        client.sock.send(stranger.seal(dg.Packet(dg.Kind.PING, 0)))
        return await client.answers()

    answers = world.run(scenario())
    assert world.seen[payload] == 1
    assert not any(k.startswith(b"forged ") for k in world.seen)
    assert len(answers) == 1  # the one authentic datagram's echo, nothing else


def test_redundant_copies_reach_the_destination_once(world: World, client: Client) -> None:
    payloads = [b"copy %d " % i + os.urandom(4) for i in range(20)]

    async def scenario():
        for payload in payloads:
            client.number += 1
            for link in (0, 1):  # same number on two links: the second copy must be dropped
                client.sock.send(client.data(payload, link=link, number=client.number))
        return await client.answers()

    world.run(scenario())
    assert all(world.seen[p] == 1 for p in payloads), [world.seen[p] for p in payloads]


def test_a_pong_is_never_larger_than_its_ping(world: World, client: Client) -> None:
    async def scenario():
        ping = client.sealer.seal(dg.Packet(dg.Kind.PING, 0, 0, 12345))
        client.sock.send(ping)
        return ping, await client.answers()

    ping, answers = world.run(scenario())
    assert len(answers) == 1 and len(answers[0]) <= len(ping)


@pytest.mark.parametrize("server", [SERVER_V4, SERVER_V6])
def test_ipv6_to_the_server_and_to_the_destination(world: World, server: str) -> None:
    payload = b"v6 " + os.urandom(8)

    async def scenario():
        c = await Client.open(world.pairing, server)
        try:
            c.sock.send(c.data(payload, target=TARGET_V6))
            return await c.answers()
        finally:
            await c.close()

    answers = world.run(scenario())
    assert world.seen[payload] == 1 and len(answers) == 1


def test_a_session_ends_with_its_tunnel(world: World) -> None:
    payload = b"late " + os.urandom(8)

    async def scenario():
        c = await Client.open(world.pairing)
        sealed = c.data(payload)
        await c.tunnel.close()
        await asyncio.sleep(0.3)
        c.sock.send(sealed)
        answers = await c.answers()
        c.sock.close()
        return answers

    assert world.run(scenario()) == []
    assert world.seen[payload] == 0


def test_a_closed_flow_releases_its_socket(world: World, client: Client) -> None:
    def sockets() -> int:
        return len(list(Path(f"/proc/{world.server.proc.pid}/fd").iterdir()))

    async def scenario():
        client.sock.send(client.data(b"open " + os.urandom(4)))
        await client.answers(0.3)
        opened = sockets()
        close = dg.Packet(dg.Kind.CLOSE, dg.TUNNEL_LINK, flow=1)
        await client.tunnel.send_datagram(client.sealer.seal(close))
        await asyncio.sleep(0.3)
        return opened, sockets()

    opened, closed = world.run(scenario())
    assert closed == opened - 1
