"""braid-server as a real process in a throwaway network namespace.

The namespace holds the server (listening on 198.18.100.1 / [2001:db8:100::1]),
target services on 198.18.200.1 and [2001:db8:200::1] (allowed by the test
configuration, since they are the server's own addresses here), and the
test's client code, run by a thread that entered the namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import re
import signal
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from server_netns import Netns, NetnsLoop, ServerProcess, init_state, ip, new_token

from braid.protocol.address import Address, decode_address, encode_address
from braid.protocol.pairing import Pairing
from braid.protocol.tunnel import EOF_FRAME, FrameDecoder, Reply, encode_hello, frame_header
from braid.transport import client_tls_context, is_mptcp
from braid.tunnel_client import Tunnel, TunnelError, open_tunnel

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

SERVER_V4 = "198.18.100.1"
OTHER_CLIENT_V4 = "198.18.100.2"
SILENT_CLIENT_V4 = "198.18.100.3"  # warnings are rate-limited per source: each test its own
SLOW_CLIENT_V4 = "198.18.100.4"
STRANGER_V4 = "198.18.100.5"  # connects and says nothing while a device's tunnel is open
DEVICE_V4 = "198.18.100.6"
SERVER_V6 = "2001:db8:100::1"
TARGET_V4 = "198.18.200.1"
TARGET_V6 = "2001:db8:200::1"
TARGET_NAME = "target.braid.test"
LOOP_NAME = "loop.braid.test"
PORT = 7443
TARGET_PORT = 9000
CLOSED_PORT = 9001
HANDSHAKE_TIMEOUT = 1.5
IDLE_TIMEOUT = 1.5


@dataclasses.dataclass
class World:
    netns: Netns
    loop: NetnsLoop
    server: ServerProcess
    pairing: Pairing
    state_dir: Path
    tmp: Path
    host_limits: str

    def run(self, coro, timeout: float = 30):
        return self.loop.run(coro, timeout)


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Target service: read everything, then answer with it, prefixed (tests the half-close)."""
    data = await reader.read()
    writer.write(b"echo:" + data)
    await writer.drain()
    writer.close()


async def _start_targets() -> asyncio.Server:
    return await asyncio.start_server(_answer, [TARGET_V4, TARGET_V6], TARGET_PORT)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("braid-server")
    netns = Netns(f"brdsrv{os.getpid()}")
    host_limits = ip("mptcp", "limits").stdout
    netns.create()
    loop: NetnsLoop | None = None
    server: ServerProcess | None = None
    try:
        # The kernel may lack the dummy driver; a veth pair inside the namespace works anywhere.
        netns.veth(
            (
                SERVER_V4,
                OTHER_CLIENT_V4,
                SILENT_CLIENT_V4,
                SLOW_CLIENT_V4,
                STRANGER_V4,
                DEVICE_V4,
                TARGET_V4,
            ),
            (SERVER_V6, TARGET_V6),
        )
        netns.write_etc(
            "hosts",
            f"127.0.0.1 localhost\n::1 localhost\n{TARGET_V4} {TARGET_NAME}\n"
            f"{TARGET_V6} {TARGET_NAME}\n127.0.0.1 {LOOP_NAME}\n",
        )
        # Names not in hosts fail at once instead of waiting for a DNS server.
        netns.write_etc("resolv.conf", "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")

        state_dir = tmp / "state"
        pairing = init_state(
            state_dir,
            f"[::]:{PORT}",
            SERVER_V4,
            policy={"allow": [f"{TARGET_V4}/24", f"{TARGET_V6}/64"], "deny": []},
            timeouts={"handshake": HANDSHAKE_TIMEOUT, "idle": IDLE_TIMEOUT, "connect": 3},
        )
        loop = NetnsLoop(netns)
        loop.run(_start_targets())
        server = ServerProcess(netns, state_dir, tmp / "server.log").start()
        yield World(netns, loop, server, pairing, state_dir, tmp, host_limits)
    finally:
        rc = server.stop() if server else None
        if loop:
            loop.close()
        netns.delete()
        if server:
            print(server.log())
    assert rc == 0, "braid-server did not exit cleanly on SIGTERM"


async def _exchange(tunnel: Tunnel, payload: bytes) -> bytes:
    """Send ``payload`` framed, end our direction, and read the answer to its end."""
    for i in range(0, len(payload), 0xFFFF):
        chunk = payload[i : i + 0xFFFF]
        tunnel.writer.write(frame_header(len(chunk)) + chunk)
    tunnel.writer.write(EOF_FRAME)
    await tunnel.writer.drain()
    decoder = FrameDecoder()
    answer = bytearray()
    while not decoder.eof:
        data = await tunnel.reader.read(1 << 16)
        assert data, "the tunnel closed before the end-of-stream frame"
        for chunk in decoder.feed(data):
            answer += chunk
    return bytes(answer)


async def _connect_and_exchange(
    pairing: Pairing, host: str, payload: bytes, **kwargs
) -> tuple[bool, Reply, Address, bytes]:
    tunnel = await open_tunnel(pairing, **kwargs)
    try:
        mptcp = is_mptcp(tunnel.sock)
        reply = await tunnel.request(Address(host, TARGET_PORT))
        answer = await _exchange(tunnel, payload) if reply.code == Reply.SUCCEEDED else b""
        return mptcp, reply.code, reply.address, answer
    finally:
        await tunnel.close()


async def _request(pairing: Pairing, address: Address) -> Reply:
    tunnel = await open_tunnel(pairing)
    try:
        return (await tunnel.request(address)).code
    finally:
        await tunnel.close()


def test_mptcp_limits_raised_in_the_namespace_only(world: World) -> None:
    assert "subflows 8" in world.netns.ip("mptcp", "limits").stdout
    assert ip("mptcp", "limits").stdout == world.host_limits
    assert "raised the MPTCP subflow limit from 2 to 8" in world.server.log()
    assert "listening on [::]:7443 (MPTCP)" in world.server.log()


@pytest.mark.parametrize(
    ("host", "expected"),
    [(TARGET_V4, {TARGET_V4}), (TARGET_V6, {TARGET_V6}), (TARGET_NAME, {TARGET_V4, TARGET_V6})],
)
def test_relays_both_ways_with_half_close(world: World, host: str, expected: set[str]) -> None:
    payload = os.urandom(300_000)  # several frames each way
    mptcp, code, bound, answer = world.run(_connect_and_exchange(world.pairing, host, payload))
    assert mptcp, "the tunnel fell back to plain TCP"
    assert code == Reply.SUCCEEDED
    assert bound.host in expected and bound.port == TARGET_PORT
    assert answer == b"echo:" + payload


def test_plain_tcp_client_works_too(world: World) -> None:
    mptcp, code, _, answer = world.run(
        _connect_and_exchange(world.pairing, TARGET_V4, b"plain", mptcp=False)
    )
    assert not mptcp
    assert code == Reply.SUCCEEDED
    assert answer == b"echo:plain"


def test_tunnel_from_a_bound_address(world: World) -> None:
    async def scenario() -> tuple:
        tunnel = await open_tunnel(world.pairing, bind=(OTHER_CLIENT_V4, 0))
        await tunnel.close()
        return tunnel.local

    assert world.run(scenario())[0] == OTHER_CLIENT_V4


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "::1", "169.254.169.254", "::ffff:127.0.0.1", SERVER_V4, SERVER_V6, LOOP_NAME],
)
def test_refused_destinations(world: World, host: str) -> None:
    address = Address(host, TARGET_PORT)
    assert world.run(_request(world.pairing, address)) == Reply.NOT_ALLOWED
    as_received = decode_address(encode_address(address))[0]  # ::ffff:7f00:1 for one
    world.server.wait_for_log(f"refused {as_received}: ")


@pytest.mark.parametrize(
    ("address", "code"),
    [
        (Address("nowhere.invalid", 80), Reply.HOST_UNREACHABLE),
        (Address(TARGET_V4, CLOSED_PORT), Reply.CONNECTION_REFUSED),
        (Address(TARGET_V6, CLOSED_PORT), Reply.CONNECTION_REFUSED),
    ],
)
def test_unreachable_destinations(world: World, address: Address, code: Reply) -> None:
    assert world.run(_request(world.pairing, address)) == code


def test_wrong_token_is_dropped_without_a_byte(world: World) -> None:
    async def raw_client() -> bytes:
        reader, writer = await asyncio.open_connection(
            SERVER_V4, PORT, ssl=client_tls_context(), server_hostname=""
        )
        writer.write(encode_hello("x" * 43))
        try:
            return await asyncio.wait_for(reader.read(), 5)
        except (ConnectionError, OSError):
            return b""
        finally:
            writer.transport.abort()

    assert world.run(raw_client()) == b""
    world.server.wait_for_log(f"WARNING rejected {SERVER_V4}:")
    pattern = rf"WARNING rejected {re.escape(SERVER_V4)}:\d+: wrong token"
    assert re.search(pattern, world.server.log())

    bad = dataclasses.replace(world.pairing, token="y" * 43)
    with pytest.raises(TunnelError) as info:
        world.run(open_tunnel(bad))
    assert "token is wrong or was replaced" in str(info.value)
    assert "braid-server device add NAME" in str(info.value)
    assert info.value.fatal


def test_repeated_failures_are_logged_once_per_source(world: World) -> None:
    bad = dataclasses.replace(world.pairing, token="z" * 43)

    async def attempts() -> None:
        for _ in range(4):
            with pytest.raises(TunnelError):
                await open_tunnel(bad, bind=(OTHER_CLIENT_V4, 0))

    world.run(attempts())
    time.sleep(0.3)
    assert world.server.log().count(f"rejected {OTHER_CLIENT_V4}:") == 1


def test_wrong_fingerprint(world: World) -> None:
    wrong = dataclasses.replace(world.pairing, fingerprint="ab" * 32)
    with pytest.raises(TunnelError) as info:
        world.run(open_tunnel(wrong))
    text = str(info.value)
    assert "fingerprint mismatch" in text
    assert "abababab" in text and world.pairing.fingerprint[:16] in text
    assert info.value.fatal


def test_silent_client_is_dropped_after_the_handshake_timeout(world: World) -> None:
    async def silent() -> float:
        reader, writer = await asyncio.open_connection(
            SERVER_V4, PORT, local_addr=(SILENT_CLIENT_V4, 0)
        )
        started = time.monotonic()
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), HANDSHAKE_TIMEOUT + 5) == b""
        writer.close()
        return time.monotonic() - started

    waited = world.run(silent())
    assert HANDSHAKE_TIMEOUT - 0.2 < waited < HANDSHAKE_TIMEOUT + 2
    world.server.wait_for_log(f"rejected {SILENT_CLIENT_V4}:")
    assert f"no TLS handshake and HELLO within {HANDSHAKE_TIMEOUT:g} s" in world.server.log()


def test_slow_loris_client_is_dropped_at_the_handshake_timeout(world: World) -> None:
    """A client that keeps sending, one byte of a real ClientHello at a time, gains nothing:
    the timeout covers the whole handshake and HELLO, not the gaps between bytes."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    hello = client_tls_context().wrap_bio(incoming, outgoing)
    with contextlib.suppress(ssl.SSLWantReadError):
        hello.do_handshake()
    client_hello = outgoing.read()

    async def trickle() -> tuple[float, int]:
        reader, writer = await asyncio.open_connection(
            SERVER_V4, PORT, local_addr=(SLOW_CLIENT_V4, 0)
        )
        started = time.monotonic()
        sent = 0
        with contextlib.suppress(ConnectionError):
            for byte in client_hello:
                writer.write(bytes([byte]))
                await writer.drain()
                sent += 1
                if reader.at_eof() or time.monotonic() - started > HANDSHAKE_TIMEOUT + 5:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reader.read(1), 0.2)
        writer.close()
        return time.monotonic() - started, sent

    waited, sent = world.run(trickle())
    assert sent < len(client_hello)  # dropped before the ClientHello was even complete
    assert HANDSHAKE_TIMEOUT - 0.2 < waited < HANDSHAKE_TIMEOUT + 2
    world.server.wait_for_log(f"rejected {SLOW_CLIENT_V4}:")


def test_idle_tunnel_is_closed_after_the_idle_timeout(world: World) -> None:
    async def idle() -> tuple[bool, bool]:
        tunnel = await open_tunnel(world.pairing)
        alive_at_first = tunnel.is_alive()
        await asyncio.wait_for(tunnel.reader.read(), IDLE_TIMEOUT + 5)
        alive_after = tunnel.is_alive()
        await tunnel.close()
        return alive_at_first, alive_after

    assert world.run(idle()) == (True, False)


def test_port_in_use_is_one_clear_line(world: World) -> None:
    result = subprocess.run(
        world.server.argv(), capture_output=True, text=True, timeout=20, env=world.server.env()
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "cannot listen on [::]:7443: the port is already in use" in result.stderr


def test_missing_certificate_is_one_clear_line(world: World) -> None:
    broken = world.tmp / "broken"
    init_state(broken, f"{SERVER_V4}:7444")
    (broken / "cert.pem").unlink()
    result = subprocess.run(
        ServerProcess(world.netns, broken, world.tmp / "broken.log").argv(),
        capture_output=True,
        text=True,
        timeout=20,
        env=ServerProcess.env(),
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "cert.pem is missing" in result.stderr


def test_sigusr1_logs_stats_and_sigterm_closes_tunnels_and_exits_0(world: World) -> None:
    state = world.tmp / "second"
    pairing = init_state(state, f"{SERVER_V4}:7445")
    second = ServerProcess(world.netns, state, world.tmp / "second.log").start()
    try:
        tunnel = world.run(open_tunnel(pairing))
        assert second.proc is not None
        second.proc.send_signal(signal.SIGUSR1)
        second.wait_for_log("stats: 1 open from 1 client addresses, 1 accepted")
        assert second.stop(signal.SIGTERM) == 0
        assert world.run(asyncio.wait_for(tunnel.reader.read(), 5)) == b""
        world.run(tunnel.close())
        assert "SIGTERM: shutting down" in second.log()
    finally:
        second.stop(signal.SIGKILL)


def test_new_token_locks_out_the_old_one_without_restart(world: World) -> None:
    fresh = new_token(world.state_dir)
    assert fresh.fingerprint == world.pairing.fingerprint
    assert fresh.token != world.pairing.token
    with pytest.raises(TunnelError, match="token is wrong or was replaced"):
        world.run(open_tunnel(world.pairing))
    code = world.run(_request(fresh, Address(TARGET_V4, CLOSED_PORT)))
    assert code == Reply.CONNECTION_REFUSED
    world.pairing = fresh


def test_client_error_messages(world: World) -> None:
    refused = dataclasses.replace(world.pairing, port=7999)
    expected = r"^cannot reach 198\.18\.100\.1:7999: connection refused$"
    with pytest.raises(TunnelError, match=expected):
        world.run(open_tunnel(refused))

    # An address on the link that nobody answers for: ARP never resolves.
    silent = dataclasses.replace(world.pairing, host="198.18.100.77")
    with pytest.raises(TunnelError, match=r"^timed out connecting to 198\.18\.100\.77:7443"):
        world.run(open_tunnel(silent, timeout=0.5))

    async def not_braid() -> str:
        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"SSH-2.0-OpenSSH_9.2\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(hang_up, TARGET_V4, 2222)
        try:
            await open_tunnel(dataclasses.replace(world.pairing, host=TARGET_V4, port=2222))
        except TunnelError as exc:
            return str(exc)
        finally:
            server.close()
        return "no error"

    message = world.run(not_braid())
    assert message.startswith("the TLS handshake with 198.18.200.1:2222 failed")
    assert "is it a braid-server?" in message


def test_kernel_without_mptcp_falls_back_to_plain_tcp(world: World) -> None:
    def mptcp_enabled(value: int) -> None:
        argv = world.netns.exec_argv(["sysctl", "-qw", f"net.mptcp.enabled={value}"])
        subprocess.run(argv, check=True, timeout=10)

    state = world.tmp / "no-mptcp"
    pairing = init_state(state, f"{SERVER_V4}:7446", policy={"allow": [f"{TARGET_V4}/32"]})
    server = ServerProcess(world.netns, state, world.tmp / "no-mptcp.log")
    mptcp_enabled(0)
    try:
        server.start()
        mptcp, code, _, answer = world.run(_connect_and_exchange(pairing, TARGET_V4, b"tcp"))
    finally:
        mptcp_enabled(1)
        server.stop()
    assert not mptcp
    assert (code, answer) == (Reply.SUCCEEDED, b"echo:tcp")
    log = server.log()
    assert "WARNING this kernel does not offer Multipath TCP" in log
    assert "listening on 198.18.100.1:7446 (plain TCP)" in log
    assert "MPTCP subflow limit" not in log


def _receive_buffers(world: World, peer_ip: str) -> list[int]:
    """The receive buffer sizes (ss skmem rb) of the server's sockets whose peer is
    ``peer_ip``."""
    done = subprocess.run(
        world.netns.exec_argv(["ss", "-tmnMH", "state", "established"]),
        capture_output=True,
        text=True,
        check=True,
    )
    sizes = []
    lines = done.stdout.splitlines()
    for head, info in itertools.pairwise(lines):
        if f"{peer_ip}]:" in head.split()[-1] or head.split()[-1].startswith(f"{peer_ip}:"):
            found = re.search(r"rb(\d+)", info)
            if found and f":{PORT}" in head.split()[-2]:
                sizes.append(int(found.group(1)))
    return sizes


def test_only_an_authenticated_devices_tunnel_gets_the_fixed_buffer(world: World) -> None:
    """A stranger's connection keeps autotuning (a fixed 16 MiB buffer per handshake would let
    anyone park memory on the server); a device's tunnel gets it with its first request."""
    held: dict = {}

    async def open_both() -> None:
        held["stranger"] = await asyncio.open_connection(
            SERVER_V4, PORT, local_addr=(STRANGER_V4, 0)
        )
        tunnel = await open_tunnel(world.pairing, bind=(DEVICE_V4, 0))
        held["tunnel"] = tunnel
        assert (await tunnel.request(Address(TARGET_V4, TARGET_PORT))).code == Reply.SUCCEEDED

    async def close_both() -> None:
        await held["tunnel"].close()
        held["stranger"][1].close()

    world.run(open_both())
    try:
        time.sleep(0.2)
        assert 16 << 20 in _receive_buffers(world, DEVICE_V4)
        stranger = _receive_buffers(world, STRANGER_V4)
        assert stranger and all(size < 16 << 20 for size in stranger)
    finally:
        world.run(close_both())
