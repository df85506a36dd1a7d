"""braid-server under floods of unauthenticated connections, as a real process in a namespace.

The attacker here shares the laptop's own address (a process on the laptop, or
a neighbour behind the same NAT): nothing it does may keep the laptop from
connecting, or slow its open tunnels.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import time

import pytest
from server_netns import Netns, NetnsLoop, ServerProcess, init_state

from braid.protocol.address import Address
from braid.protocol.pairing import Pairing
from braid.protocol.tunnel import EOF_FRAME, FrameDecoder, Reply, frame_header
from braid.server.admission import TOTAL
from braid.server.server import ACCEPT_BATCH
from braid.tunnel_client import Tunnel, open_tunnel

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

SERVER_V4 = "198.18.101.1"
LAPTOP_V4 = "198.18.101.2"  # the laptop's link address, and the attacker's
TARGET_V4 = "198.18.101.3"
PORT = 7443
ECHO_PORT = 9000
HANDSHAKE_TIMEOUT = 5.0


class Flooded:
    def __init__(
        self, netns: Netns, loop: NetnsLoop, server: ServerProcess, pairing: Pairing
    ) -> None:
        self.netns, self.loop, self.server, self.pairing = netns, loop, server, pairing

    def attack(self, *kinds: str, **options: object) -> subprocess.Popen:
        """The flood as another program on the laptop's address (see braid.netbed.flood)."""
        argv = [sys.executable, "-m", "braid.netbed.flood", SERVER_V4, str(PORT), *kinds]
        argv += ["--local", LAPTOP_V4]
        for name, value in options.items():
            argv += [f"--{name}", str(value)]
        return subprocess.Popen(
            self.netns.exec_argv(argv), stdout=subprocess.PIPE, text=True, env=ServerProcess.env()
        )

    def attacked(self, *kinds: str, **options: object) -> list[dict]:
        """Run a flood to its end; one result per kind."""
        proc = self.attack(*kinds, **options)
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0
        return [json.loads(line) for line in out.splitlines()]

    def run(self, coro, timeout: float = 60):
        return self.loop.run(coro, timeout)

    def descriptors(self) -> int:
        assert self.server.proc is not None
        return len(os.listdir(f"/proc/{self.server.proc.pid}/fd"))


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    # The flood holds hundreds of sockets in this process.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    tmp = tmp_path_factory.mktemp("braid-flood")
    netns = Netns(f"brdfld{os.getpid()}")
    netns.create()
    loop: NetnsLoop | None = None
    server: ServerProcess | None = None
    try:
        netns.ip("link", "add", "fld0", "type", "veth", "peer", "name", "fld1")
        for dev in ("fld0", "fld1"):
            netns.ip("link", "set", dev, "up")
        for addr in (SERVER_V4, LAPTOP_V4, TARGET_V4):
            netns.ip("addr", "add", f"{addr}/24", "dev", "fld0")
        state_dir = tmp / "state"
        pairing = init_state(
            state_dir,
            f"{SERVER_V4}:{PORT}",
            policy={"allow": [f"{TARGET_V4}/32"], "deny": []},
            timeouts={"handshake": HANDSHAKE_TIMEOUT},
        )
        loop = NetnsLoop(netns)
        loop.run(asyncio.start_server(_echo, TARGET_V4, ECHO_PORT))
        server = ServerProcess(netns, state_dir, tmp / "server.log").start()
        yield Flooded(netns, loop, server, pairing)
    finally:
        rc = server.stop() if server else None
        if loop:
            loop.close()
        netns.delete()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        if server:
            print(server.log())
    assert rc == 0, "braid-server did not exit cleanly on SIGTERM"


async def _connect_in_time(pairing: Pairing, limit: float = 3.0) -> float:
    """A legitimate tunnel from the laptop's address, used for a request: seconds it took."""
    started = time.monotonic()
    tunnel = await open_tunnel(pairing, bind=(LAPTOP_V4, 0), timeout=limit)
    try:
        reply = await tunnel.request(Address(TARGET_V4, ECHO_PORT), timeout=limit)
        assert reply.code == Reply.SUCCEEDED
        assert await _round_trip(tunnel, b"hello") == b"hello"
    finally:
        await tunnel.close()
    return time.monotonic() - started


async def _round_trip(tunnel: Tunnel, payload: bytes) -> bytes:
    tunnel.writer.write(frame_header(len(payload)) + payload)
    await tunnel.writer.drain()
    decoder = FrameDecoder()
    got = bytearray()
    while len(got) < len(payload):
        data = await asyncio.wait_for(tunnel.reader.read(65536), 5)
        assert data, "the tunnel closed"
        for chunk in decoder.feed(data):
            got += chunk
    return bytes(got)


@pytest.mark.parametrize("count", [10, 1600])
def test_connect_and_close_from_the_laptops_address_never_locks_it_out(
    world: Flooded, count: int
) -> None:
    (result,) = world.attacked("close", count=count)
    assert result["connected"] > count * 0.9
    took = world.run(_connect_in_time(world.pairing))
    assert took < 3.0


def test_wrong_tokens_from_the_laptops_address_never_lock_it_out(world: Flooded) -> None:
    world.attacked("token:10", count=30)
    assert world.run(_connect_in_time(world.pairing)) < 3.0


def test_an_authenticated_client_keeps_working_through_a_flood(world: Flooded) -> None:
    """Silent connections (more than the server keeps), connect-and-close and garbage, all
    from the laptop's address, while a tunnel relays and new tunnels open."""
    before = world.descriptors()

    attack = world.attack("silent:800", "close:50", "garbage:50", duration=8)

    async def scenario() -> tuple[list[float], int]:
        tunnel = await open_tunnel(world.pairing, bind=(LAPTOP_V4, 0))
        reply = await tunnel.request(Address(TARGET_V4, ECHO_PORT))
        assert reply.code == Reply.SUCCEEDED
        await asyncio.sleep(1.5)  # the flood is at full strength
        times: list[float] = []
        peak = 0
        for i in range(5):
            payload = os.urandom(60_000)
            assert await _round_trip(tunnel, payload) == payload, f"round {i}"
            times.append(await _connect_in_time(world.pairing))
            peak = max(peak, world.descriptors())
            await asyncio.sleep(0.5)
        tunnel.writer.write(EOF_FRAME)
        await tunnel.close()
        return times, peak

    try:
        times, peak = world.run(scenario(), timeout=90)
    finally:
        out, _ = attack.communicate(timeout=30)
    pushed_out = json.loads(out.splitlines()[0])["dropped_by_server"]
    assert max(times) < 3.0, times
    assert pushed_out > 0  # the server let go of silent connections beyond its limit
    # Whatever the flood held open, the server kept at most TOTAL handshakes (and those of
    # the last batch it accepted, until their tasks close them).
    assert peak < before + TOTAL + ACCEPT_BATCH + 16, (before, peak)


def test_two_thousand_failures_make_no_traceback(world: Flooded) -> None:
    world.attacked("garbage", count=2000)
    assert world.run(_connect_in_time(world.pairing)) < 3.0
    log = world.server.log()
    assert "Traceback" not in log
    # Rate-limited: a line per address per 10 s, not one per connection.
    assert log.count(f"rejected {LAPTOP_V4}:") < 10
