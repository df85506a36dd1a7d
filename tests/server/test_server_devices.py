"""A household's devices on one braid-server, a real process in a namespace: each device its
own token; adding and removing one applies at once, open tunnels included."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import time
from pathlib import Path

import pytest
from server_netns import Netns, NetnsLoop, ServerProcess, init_state

from braid.protocol.address import Address
from braid.protocol.pairing import Pairing, parse_pairing
from braid.protocol.tunnel import FrameDecoder, Reply, frame_header
from braid.server.cli import main as server_main
from braid.server.state import hash_token
from braid.tunnel_client import Tunnel, TunnelError, open_tunnel

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

SERVER_V4 = "198.18.102.1"
LAPTOP_V4 = "198.18.102.2"
PHONE_V4 = "198.18.102.3"
TARGET_V4 = "198.18.102.9"
PORT = 7443
ECHO_PORT = 9000


def cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = server_main(list(argv))
    return code, out.getvalue()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


class Household:
    def __init__(self, netns: Netns, loop: NetnsLoop, tmp: Path) -> None:
        self.netns, self.loop, self.tmp = netns, loop, tmp

    def run(self, coro, timeout: float = 60):
        return self.loop.run(coro, timeout)


@pytest.fixture(scope="module")
def house(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("braid-devices")
    netns = Netns(f"brddev{os.getpid()}")
    netns.create()
    loop: NetnsLoop | None = None
    try:
        netns.ip("link", "add", "dev0", "type", "veth", "peer", "name", "dev1")
        for dev in ("dev0", "dev1"):
            netns.ip("link", "set", dev, "up")
        for addr in (SERVER_V4, LAPTOP_V4, PHONE_V4, TARGET_V4):
            netns.ip("addr", "add", f"{addr}/24", "dev", "dev0")
        loop = NetnsLoop(netns)
        loop.run(asyncio.start_server(_echo, TARGET_V4, ECHO_PORT))
        yield Household(netns, loop, tmp)
    finally:
        if loop:
            loop.close()
        netns.delete()


class Stream:
    """A tunnel to the echo target that keeps a transfer going until it breaks."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        self.echoed = 0
        self.broke_at: float | None = None

    async def run(self, stop: asyncio.Event) -> None:
        decoder = FrameDecoder()
        chunk = os.urandom(16384)
        try:
            while not stop.is_set():
                self.tunnel.writer.write(frame_header(len(chunk)) + chunk)
                await self.tunnel.writer.drain()
                got = 0
                while got < len(chunk):
                    data = await asyncio.wait_for(self.tunnel.reader.read(65536), 5)
                    if not data:
                        raise ConnectionResetError("closed")
                    got += sum(len(c) for c in decoder.feed(data))
                self.echoed += got
                await asyncio.sleep(0.01)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            self.broke_at = time.monotonic()
        finally:
            await self.tunnel.close(abort=True)


async def _stream(pairing: Pairing, local: str) -> Stream:
    tunnel = await open_tunnel(pairing, bind=(local, 0), timeout=5)
    reply = await tunnel.request(Address(TARGET_V4, ECHO_PORT))
    assert reply.code == Reply.SUCCEEDED
    return Stream(tunnel)


def test_a_removed_device_is_cut_mid_transfer_while_another_goes_on(house: Household) -> None:
    state = house.tmp / "state"
    laptop = init_state(state, f"{SERVER_V4}:{PORT}", policy={"allow": [f"{TARGET_V4}/32"]})
    server = ServerProcess(house.netns, state, house.tmp / "server.log")
    server.start()
    try:
        # Added while the server runs: accepted without a restart.
        code, out = cli("device", "add", "phone", "--state-dir", str(state))
        assert code == 0
        phone = parse_pairing(out.strip().splitlines()[-1])
        assert phone.token != laptop.token and phone.fingerprint == laptop.fingerprint
        assert hash_token(phone.token) in (state / "server.json").read_text()
        assert phone.token not in (state / "server.json").read_text()

        async def scenario() -> tuple[Stream, Stream, float]:
            streams = [await _stream(laptop, LAPTOP_V4), await _stream(phone, PHONE_V4)]
            stop = asyncio.Event()
            tasks = [asyncio.ensure_future(s.run(stop)) for s in streams]
            await asyncio.sleep(1.0)
            assert all(s.echoed > 0 and s.broke_at is None for s in streams)
            removed = time.monotonic()
            loop = asyncio.get_running_loop()
            code, _ = await loop.run_in_executor(
                None, cli, "device", "remove", "phone", "--state-dir", str(state)
            )
            assert code == 0
            await asyncio.sleep(2.0)
            laptop_before = streams[0].echoed
            await asyncio.sleep(1.0)
            assert streams[0].echoed > laptop_before, "the laptop's transfer stopped"
            stop.set()
            await asyncio.gather(*tasks)
            return streams[0], streams[1], removed

        laptop_stream, phone_stream, removed = house.run(scenario())
        assert laptop_stream.broke_at is None
        assert phone_stream.broke_at is not None
        assert phone_stream.broke_at - removed < 1.5, "the phone was not cut at once"

        with pytest.raises(TunnelError, match="this device was removed") as info:
            house.run(open_tunnel(phone, bind=(PHONE_V4, 0)))
        assert info.value.fatal
        house.run(_stream(laptop, LAPTOP_V4))  # still welcome

        log = server.wait_for_log("device phone was removed or its token replaced")
        assert "closing its 1 tunnels" in log
        assert f"first-device from {LAPTOP_V4}:" in log  # the log names the device

        time.sleep(0.3)
        assert server.stop() == 0  # writes what it saw last
        code, out = cli("device", "list", "--state-dir", str(state))
        assert code == 0
        lines = out.splitlines()
        assert lines[0].split()[:3] == ["DEVICE", "ADDED", "LAST"]
        [row] = [line for line in lines if line.startswith("first-device")]
        assert LAPTOP_V4 in row and " ago" in row and row.endswith(" MB")
        assert not any(line.startswith("phone") for line in lines)
        seen = json.loads((state / "devices-seen.json").read_text())
        assert seen["devices"]["first-device"]["bytes_up"] > 16384
        assert "phone" not in seen["devices"]
    finally:
        server.stop()
        print(server.log())


def test_device_list_while_running_shows_open_tunnels(house: Household) -> None:
    state = house.tmp / "listing"
    pairing = init_state(state, f"{SERVER_V4}:{PORT + 1}", policy={"allow": [f"{TARGET_V4}/32"]})
    server = ServerProcess(house.netns, state, house.tmp / "listing.log").start()
    try:
        stream = house.run(_stream(pairing, LAPTOP_V4))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            _, out = cli("device", "list", "--state-dir", str(state))
            header, *rows = out.splitlines()
            [row] = [line for line in rows if line.startswith("first-device")]
            if row[header.index("TUNNELS") :].split()[0] == "1":
                break
            time.sleep(0.5)
        else:
            raise AssertionError(out)
        assert "is it running?" not in out
        house.run(stream.tunnel.close())
    finally:
        assert server.stop() == 0


def test_an_old_single_token_server_json_upgrades_and_keeps_its_client(house: Household) -> None:
    state = house.tmp / "old"
    pairing = init_state(state, f"{SERVER_V4}:{PORT + 2}", policy={"allow": [f"{TARGET_V4}/32"]})
    path = state / "server.json"
    config = json.loads(path.read_text())
    old = {k: v for k, v in config.items() if k != "devices"}
    old.update(format=1, token_sha256=config["devices"][0]["token_sha256"])
    path.write_text(json.dumps(old))

    server = ServerProcess(house.netns, state, house.tmp / "old.log").start()
    try:
        house.run(_stream(pairing, LAPTOP_V4))  # the old pairing still works
    finally:
        assert server.stop() == 0
    upgraded = json.loads(path.read_text())
    assert upgraded["format"] == 2 and "token_sha256" not in upgraded
    assert [d["name"] for d in upgraded["devices"]] == ["first-device"]
    code, out = cli("device", "list", "--state-dir", str(state))
    assert code == 0 and out.startswith("DEVICE")
