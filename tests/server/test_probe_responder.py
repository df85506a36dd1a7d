"""braid-server's health-probe responder: in-process with a fake clock, then the real server
in a throwaway namespace."""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from server_netns import Netns, ServerProcess, init_state, new_token

from braid.netbed.nsutil import entered
from braid.protocol import probe
from braid.protocol.probe import Probe, ProbeType
from braid.server.probe import ProbeResponder, source_key
from braid.server.state import hash_token

SERVER_V4 = "198.18.100.1"
SERVER_V6 = "2001:db8:100::1"
CLIENT_V6 = "2001:db8:100::2"
CLIENTS_V4 = [f"198.18.100.{i}" for i in range(2, 9)]  # the limits are per source: one per test
PORT = 7543
NONCE = bytes(8)


# --- in process ------------------------------------------------------------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple]] = []

    def sendto(self, data: bytes, addr: tuple) -> None:
        self.sent.append((data, addr))

    def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def responder(token: list[str], **kwargs) -> tuple[ProbeResponder, FakeTransport, Clock]:
    clock = Clock()
    r = ProbeResponder(lambda: token, clock=clock, **kwargs)
    transport = FakeTransport()
    r.connection_made(transport)  # type: ignore[arg-type]
    return r, transport, clock


def request(token: str, seq: int, link: int = 0) -> bytes:
    return probe.encode_request(probe.key_from_token(token), link, seq, 12345, os.urandom(8))


def test_answers_with_the_same_size_and_fields() -> None:
    r, transport, _ = responder([hash_token("t")])
    data = probe.encode_request(probe.key_from_token("t"), 7, 99, 123456789, NONCE)
    r.datagram_received(data, ("192.0.2.1", 40000))
    [(reply, addr)] = transport.sent
    assert addr == ("192.0.2.1", 40000) and len(reply) == len(data)
    assert probe.parse(probe.key_from_token("t"), reply) == Probe(
        ProbeType.REPLY,
        7,
        99,
        123456789,
        NONCE,
        probe.parse(probe.key_from_token("t"), data).sent_ms,
    )


def test_drops_what_must_not_be_answered() -> None:
    r, transport, _ = responder([hash_token("t")])
    data = request("t", 1)
    r.datagram_received(data, ("192.0.2.1", 53))  # would bounce into a DNS server
    r.datagram_received(request("other", 2), ("192.0.2.1", 40000))
    r.datagram_received(b"\0" * 42, ("192.0.2.1", 40000))
    key = probe.key_from_token("t")
    reply = probe.encode_reply(key, Probe(ProbeType.REQUEST, 0, 1, 1, NONCE))
    r.datagram_received(reply, ("192.0.2.1", 40000))  # never answer a reply: no ping-pong
    assert transport.sent == []
    r.datagram_received(data, ("192.0.2.1", 40000))
    r.datagram_received(data, ("192.0.2.1", 40001))  # a replay
    assert len(transport.sent) == 1
    s = r.stats
    assert (s.bad_source, s.wrong_key, s.malformed, s.replayed, s.answered) == (1, 1, 2, 1, 1)


def test_per_source_and_global_limits() -> None:
    r, transport, clock = responder(
        [hash_token("t")], per_source_rate=10, per_source_burst=20, global_rate=100, global_burst=50
    )
    for seq in range(100):
        r.datagram_received(request("t", seq), ("192.0.2.1", 40000))
    assert len(transport.sent) == 20
    clock.now += 1.0
    for seq in range(100, 200):
        r.datagram_received(request("t", seq), ("192.0.2.1", 40000))
    assert len(transport.sent) == 30  # 10 more after one second
    for i in range(100):  # many sources: the global bucket (50 at once, 30 used) runs dry
        r.datagram_received(request("t", 1000 + i), (f"192.0.2.{i + 2}", 40000))
    assert len(transport.sent) == 70  # refilled to its burst of 50, 10 used by the first source
    assert r.stats.rate_limited == 80 + 90 + 60


def test_ipv6_sources_share_a_limit_per_64() -> None:
    assert (
        source_key("2001:db8:1:2::5") == source_key("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    )
    assert source_key("::ffff:192.0.2.1") == "192.0.2.1"
    r, transport, _ = responder([hash_token("t")], per_source_rate=1, per_source_burst=5)
    for i in range(20):
        r.datagram_received(request("t", i), (f"2001:db8:1:2::{i + 1}", 40000, 0, 0))
    assert len(transport.sent) == 5


def test_the_key_follows_the_stored_hash() -> None:
    token = [hash_token("old")]
    r, transport, _ = responder(token)
    r.datagram_received(request("old", 1), ("192.0.2.1", 40000))
    token[0] = hash_token("new")
    r.datagram_received(request("old", 2), ("192.0.2.1", 40000))
    r.datagram_received(request("new", 3), ("192.0.2.1", 40000))
    assert len(transport.sent) == 2 and r.stats.wrong_key == 1
    assert probe.parse(probe.key_from_token("new"), transport.sent[1][0]) is not None


def test_every_device_has_its_own_key_and_a_removed_one_stops_at_once() -> None:
    hashes = [hash_token("laptop"), hash_token("phone"), hash_token("tablet")]
    r, transport, _ = responder(hashes)
    for seq, name in enumerate(("laptop", "phone", "tablet")):
        r.datagram_received(request(name, seq), ("192.0.2.1", 40000))
    assert len(transport.sent) == 3
    for (reply, _), name in zip(transport.sent, ("laptop", "phone", "tablet"), strict=True):
        assert probe.parse(probe.key_from_token(name), reply) is not None  # under its own key
    hashes.remove(hash_token("phone"))
    r.datagram_received(request("phone", 10), ("192.0.2.1", 40000))
    assert len(transport.sent) == 3 and r.stats.wrong_key == 1


class WallClock:
    def __init__(self) -> None:
        self.ms = probe.now_ms()

    def __call__(self) -> int:
        return self.ms


def test_probes_outside_30_s_of_the_server_clock_are_refused() -> None:
    wall = WallClock()
    r, transport, _ = responder([hash_token("t")], wall_ms=wall)
    key = probe.key_from_token("t")
    old = probe.encode_request(key, 0, 1, 1, os.urandom(8), sent_ms=wall.ms - 31_000)
    ahead = probe.encode_request(key, 0, 2, 1, os.urandom(8), sent_ms=wall.ms + 31_000)
    skewed = probe.encode_request(key, 0, 3, 1, os.urandom(8), sent_ms=wall.ms + 29_000)
    for data in (old, ahead, skewed):
        r.datagram_received(data, ("192.0.2.1", 40000))
    assert len(transport.sent) == 1 and r.stats.stale == 2


def test_a_captured_probe_is_never_answered_again() -> None:
    """Not after 10000 newer probes (the old memory of 8192 forgot it), nor once it is
    forgotten: by then it is stale."""
    wall = WallClock()
    r, transport, clock = responder(
        [hash_token("t")], wall_ms=wall, per_source_rate=1e6, per_source_burst=1e6,
        global_rate=1e6, global_burst=1e6,
    )  # fmt: skip
    captured = request("t", 0)
    r.datagram_received(captured, ("192.0.2.1", 40000))
    for seq in range(1, 10_001):
        r.datagram_received(request("t", seq), ("192.0.2.2", 40000))
    assert len(transport.sent) == 10_001
    for step in range(0, 70_000, 5_000):  # replayed every 5 s for 70 s
        wall.ms += 5_000 if step else 0
        clock.now += 5 if step else 0
        r.datagram_received(captured, ("192.0.2.1", 40000))
    assert len(transport.sent) == 10_001
    assert r.stats.replayed + r.stats.stale == 14 and r.stats.stale > 0
    assert len(r._seen) == 0  # forgotten once stale anyway: the memory stays bounded


def test_replays_from_the_victims_address_do_not_use_up_its_allowance() -> None:
    """400 replays a second of one captured probe, spoofed from the laptop's address: its
    own fresh probes (5 a second per link) are all still answered."""
    r, transport, clock = responder([hash_token("t")])
    captured = request("t", 0)
    r.datagram_received(captured, ("192.0.2.1", 40000))
    answered = 0
    for second in range(5):
        for _ in range(400):
            r.datagram_received(captured, ("192.0.2.1", 40000))
        for i in range(5):
            before = len(transport.sent)
            r.datagram_received(request("t", 1 + second * 5 + i), ("192.0.2.1", 40001))
            answered += len(transport.sent) - before
        clock.now += 1.0
    assert answered == 25
    assert r.stats.replayed == 2000 and r.stats.rate_limited == 0


def test_wrong_key_warnings_are_capped_in_total() -> None:
    warned: list[str] = []
    r, _, clock = responder([hash_token("t")], warn=lambda source, text: warned.append(source))
    for i in range(50):  # spoofed sources, each new
        r.datagram_received(request("x", i), (f"192.0.2.{i + 1}", 40000))
    assert len(warned) == 5
    clock.now += 2.0
    r.datagram_received(request("x", 99), ("192.0.2.200", 40000))
    assert len(warned) == 6


# --- the real server -------------------------------------------------------------------------


@dataclass
class Env:
    netns: Netns
    server: ServerProcess
    token: str
    state_dir: Path
    tmp: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if os.geteuid() != 0:
        pytest.skip("needs root to build network namespaces")
    tmp = tmp_path_factory.mktemp("braid-probe")
    netns = Netns(f"brdprb{os.getpid()}")
    netns.create()
    server: ServerProcess | None = None
    try:
        netns.veth((SERVER_V4, *CLIENTS_V4), (SERVER_V6, CLIENT_V6))
        state_dir = tmp / "state"
        pairing = init_state(state_dir, f"[::]:{PORT}", SERVER_V4)
        server = ServerProcess(netns, state_dir, tmp / "server.log").start()
        server.wait_for_log("answering health probes on udp [::]:7543")
        yield Env(netns, server, pairing.token, state_dir, tmp)
    finally:
        rc = server.stop() if server else None
        netns.delete()
        if server:
            print(server.log())
    assert rc == 0


def client(env: Env, source: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    with entered(env.netns.name):
        sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    return sock


def exchange(sock: socket.socket, datagrams: list[bytes], wait: float = 0.3) -> list[bytes]:
    """Send every datagram to the server, then collect replies until ``wait`` s of quiet."""
    server = SERVER_V6 if sock.family == socket.AF_INET6 else SERVER_V4
    for data in datagrams:
        sock.sendto(data, (server, PORT))
    replies = []
    while select.select([sock], [], [], wait)[0]:
        replies.append(sock.recv(2048))
    return replies


@pytest.mark.netns
@pytest.mark.parametrize("source", [CLIENTS_V4[0], CLIENT_V6])
def test_server_answers_an_authentic_probe(env: Env, source: str) -> None:
    key, nonce = (
        probe.key_from_token(env.token),
        os.urandom(8),
    )  # the same request twice is a replay
    with client(env, source) as sock:
        [reply] = exchange(sock, [probe.encode_request(key, 2, 5, 777, nonce)])
    assert len(reply) == probe.SIZE
    parsed = probe.parse(key, reply)
    assert parsed is not None
    assert (parsed.type, parsed.link, parsed.seq, parsed.stamp, parsed.nonce) == (
        ProbeType.REPLY, 2, 5, 777, nonce
    )  # fmt: skip


@pytest.mark.netns
def test_server_ignores_wrong_key_and_garbage(env: Env) -> None:
    wrong = probe.key_from_token("w" * 43)
    junk = [b"", b"x", b"BRP2" + os.urandom(46), os.urandom(probe.SIZE), os.urandom(1200)]
    with client(env, CLIENTS_V4[1]) as sock:
        port = sock.getsockname()[1]
        assert exchange(sock, [probe.encode_request(wrong, 0, 1, 1, NONCE), *junk]) == []
    env.server.wait_for_log(f"ignored a health probe from {CLIENTS_V4[1]}:{port} with a wrong key")


@pytest.mark.netns
def test_server_answers_no_replay(env: Env) -> None:
    data = probe.encode_request(probe.key_from_token(env.token), 0, 1, 1, os.urandom(8))
    with client(env, CLIENTS_V4[2]) as sock:
        assert len(exchange(sock, [data, data, data])) == 1


@pytest.mark.netns
def test_server_limits_replies_per_source(env: Env) -> None:
    key = probe.key_from_token(env.token)
    burst = [probe.encode_request(key, 0, seq, 1, os.urandom(8)) for seq in range(500)]
    began = time.monotonic()
    with client(env, CLIENTS_V4[3]) as sock:
        answered = len(exchange(sock, burst))
    elapsed = time.monotonic() - began
    assert 100 <= answered <= 100 + 50 * elapsed + 5, (answered, elapsed)
    with client(env, CLIENTS_V4[4]) as sock:  # others are still answered
        assert len(exchange(sock, [probe.encode_request(key, 0, 1, 1, os.urandom(8))])) == 1


@pytest.mark.netns
def test_server_runs_without_probes_when_the_udp_port_is_taken(env: Env) -> None:
    other_port = PORT + 1
    state_dir = env.tmp / "taken"
    init_state(state_dir, f"{SERVER_V4}:{other_port}")
    with entered(env.netns.name):
        squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server = ServerProcess(env.netns, state_dir, env.tmp / "taken.log")
    with squatter, tcp:
        squatter.bind((SERVER_V4, other_port))
        try:
            server.start()
            tcp.settimeout(5)
            tcp.connect((SERVER_V4, other_port))  # still serving tunnels
        finally:
            assert server.stop() == 0
    log = server.log()
    assert f"cannot answer health probes on udp {SERVER_V4}:{other_port}: " in log
    assert "the port is already in use; running without them" in log


@pytest.mark.netns
def test_server_new_token_locks_out_old_probes(env: Env) -> None:  # last: it changes the token
    fresh = new_token(env.state_dir).token
    old_key, new_key = probe.key_from_token(env.token), probe.key_from_token(fresh)
    with client(env, CLIENTS_V4[5]) as sock:
        assert exchange(sock, [probe.encode_request(old_key, 0, 1, 1, NONCE)]) == []
        [reply] = exchange(sock, [probe.encode_request(new_key, 0, 2, 1, NONCE)])
    assert probe.parse(new_key, reply) is not None
    env.token = fresh
