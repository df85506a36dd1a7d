"""Pieces of the running server that need no network: warnings, token reload, stats."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import pytest

from braid.server import server as server_module
from braid.server.server import Stats, TokenHash, WarningLimiter
from braid.server.state import ServerConfig, StateDir, hash_token


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_warnings_are_rate_limited_per_source(monkeypatch, caplog) -> None:
    clock = FakeClock()
    monkeypatch.setattr(server_module.time, "monotonic", clock)
    limiter = WarningLimiter(interval=10)
    with caplog.at_level(logging.WARNING, logger="braid.server.server"):
        assert limiter.warn("192.0.2.1", "rejected 192.0.2.1:1: wrong token")
        for _ in range(5):
            clock.now += 1
            assert not limiter.warn("192.0.2.1", "rejected 192.0.2.1:2: wrong token")
        assert limiter.warn("192.0.2.2", "rejected 192.0.2.2:1: wrong token")
        clock.now += 10
        assert limiter.warn("192.0.2.1", "rejected 192.0.2.1:3: wrong token")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "rejected 192.0.2.1:1: wrong token"
    assert lines[1] == "rejected 192.0.2.2:1: wrong token"
    assert lines[2].startswith("rejected 192.0.2.1:3: wrong token (and 5 more from 192.0.2.1")
    assert len(lines) == 3


def test_warning_limiter_memory_is_bounded(monkeypatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(server_module.time, "monotonic", clock)
    limiter = WarningLimiter(interval=10, max_sources=100)
    for i in range(1000):
        limiter.warn(f"10.0.{i // 256}.{i % 256}", "x")
    assert len(limiter._last) <= 100


def test_token_hash_follows_server_json(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    config = ServerConfig("192.0.2.1", 7443, "192.0.2.1", hash_token("a" * 43))
    tmp_path.mkdir(exist_ok=True)
    state.save(config)
    tokens = TokenHash(config, state)
    assert tokens.get() == hash_token("a" * 43)
    config.token_sha256 = hash_token("b" * 43)
    state.save(config)
    os.utime(state.config_path, ns=(1, 1))  # a different mtime even on coarse clocks
    assert tokens.get() == hash_token("b" * 43)
    state.config_path.write_text("{broken")
    os.utime(state.config_path, ns=(2, 2))
    assert tokens.get() == hash_token("b" * 43)  # keeps the last good one


def test_stats_summary() -> None:
    stats = Stats(connections=3, auth_failures=1, requests=2, bytes_up=10, bytes_down=20)
    text = stats.summary()
    assert "3 accepted" in text and "1 failed authentication" in text
    assert "10 bytes up" in text and "20 bytes down" in text


@pytest.mark.parametrize("errno_name", ["ECONNREFUSED", "ENETUNREACH", "EHOSTUNREACH"])
def test_connect_errors_map_to_reply_codes(errno_name: str) -> None:
    import errno

    from braid.protocol.tunnel import Reply

    expected = {
        "ECONNREFUSED": Reply.CONNECTION_REFUSED,
        "ENETUNREACH": Reply.NETWORK_UNREACHABLE,
        "EHOSTUNREACH": Reply.HOST_UNREACHABLE,
    }[errno_name]
    assert server_module._ERRNO_REPLY[getattr(errno, errno_name)] == expected


def test_server_tls_sends_nothing_after_the_handshake(tmp_path: Path) -> None:
    """No session tickets: a refused client gets not one byte after the handshake."""
    import ssl

    from braid.server.state import make_certificate
    from braid.transport import client_tls_context, server_tls_context

    cert, key = make_certificate("vps.example.org")
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)
    server_ctx = server_tls_context(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_tls_context().wrap_bio(c_in, c_out, server_side=False)
    for _ in range(5):
        for end in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    assert client.version() == "TLSv1.3"
    assert c_in.pending == 0
    with pytest.raises(ssl.SSLWantReadError):
        client.read(1)


def test_penalty_slows_down_an_address_that_keeps_failing(monkeypatch) -> None:
    from braid.server import server as server_module

    now = [1000.0]
    monkeypatch.setattr(server_module.time, "monotonic", lambda: now[0])
    penalty = server_module.Penalty(free=3, window=60, maximum=8)
    for _ in range(3):
        assert penalty.delay("198.18.0.9") == 0
        penalty.failed("198.18.0.9")
    delays = []
    for _ in range(6):
        delays.append(penalty.delay("198.18.0.9"))
        penalty.failed("198.18.0.9")
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert penalty.delay("198.18.0.10") == 0  # others are not affected
    now[0] += 61
    assert penalty.delay("198.18.0.9") == 0  # forgotten after the window
    penalty.failed("198.18.0.11")
    penalty.succeeded("198.18.0.11")
    assert penalty.delay("198.18.0.11") == 0


def test_penalty_memory_is_bounded() -> None:
    from braid.server.server import Penalty

    penalty = Penalty(max_sources=100)
    for i in range(1000):
        penalty.failed(f"198.18.{i // 256}.{i % 256}")
    assert len(penalty._failures) == 100
