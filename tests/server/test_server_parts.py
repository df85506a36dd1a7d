"""Pieces of the running server that need no network: warnings, token reload, stats."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import pytest

from braid.server import server as server_module
from braid.server.server import Devices, Stats, WarningLimiter
from braid.server.state import Device, ServerConfig, StateDir, hash_token


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


def test_devices_follow_server_json(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    laptop = Device("laptop", hash_token("a" * 43))
    config = ServerConfig("192.0.2.1", 7443, "192.0.2.1", [laptop])
    state.save(config)
    devices = Devices(config, state)
    assert devices.match(b"a" * 43) == laptop
    assert devices.match(b"b" * 43) is None
    phone = Device("phone", hash_token("b" * 43))
    config.devices = [laptop, phone]
    state.save(config)
    os.utime(state.config_path, ns=(1, 1))  # a different mtime even on coarse clocks
    assert devices.match(b"b" * 43) == phone
    assert devices.current(laptop) and devices.current(phone)
    config.devices = [phone]
    state.save(config)
    os.utime(state.config_path, ns=(2, 2))
    assert devices.match(b"a" * 43) is None
    assert not devices.current(laptop) and devices.current(phone)
    assert devices.hashes() == [phone.token_sha256]
    state.config_path.write_text("{broken")
    os.utime(state.config_path, ns=(3, 3))
    assert devices.match(b"b" * 43) == phone  # keeps the last good list


def test_an_old_server_json_upgrades_in_place(tmp_path: Path) -> None:
    import json

    old = {
        "format": 1,
        "listen": "[::]:7443",
        "public_host": "vps.example.org",
        "token_sha256": hash_token("old" * 14),
        "policy": {"allow": ["198.18.0.0/15"], "deny": []},
        "timeouts": {"handshake": 5, "idle": 60, "connect": 10, "udp_idle": 120},
    }
    (tmp_path / "server.json").write_text(json.dumps(old))
    config = StateDir(tmp_path).load()
    assert config.devices == [Device("first-device", hash_token("old" * 14), "")]
    assert config.allow == ["198.18.0.0/15"] and config.timeouts.handshake == 5
    written = json.loads((tmp_path / "server.json").read_text())
    assert written["format"] == 2 and "token_sha256" not in written
    assert written["devices"][0]["token_sha256"] == old["token_sha256"]
    assert StateDir(tmp_path).load() == config
    assert Devices(config, StateDir(tmp_path)).match(("old" * 14).encode()) is not None


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


def test_admission_drops_a_sources_junk_first() -> None:
    from braid.server.admission import CLOSED_OR_GARBAGE, SILENT, TLS, Admission

    clock = FakeClock()
    admission = Admission(per_source=3, total=100, grace=1.0, clock=clock)
    dropped: list[str] = []

    def admit(name: str, standing: int) -> None:
        admission.admit("198.18.0.9", lambda: dropped.append(name), lambda: standing)

    admit("client", TLS)
    admit("quiet", SILENT)
    admit("garbage", CLOSED_OR_GARBAGE)
    admit("closed", CLOSED_OR_GARBAGE)  # the source is full: the oldest junk goes
    assert dropped == ["garbage"]
    admit("fresh", SILENT)
    assert dropped == ["garbage", "closed"]
    admit("fresh2", SILENT)  # silent for less than the grace: nobody is junk yet
    assert dropped == ["garbage", "closed"] and len(admission) == 4
    clock.now += 1.5
    admit("later", SILENT)  # silent past the grace: junk now, the oldest first
    assert dropped == ["garbage", "closed", "quiet"]
    assert "client" not in dropped


def test_a_burst_of_tls_handshakes_from_one_address_is_kept() -> None:
    """A laptop opening hundreds of tunnels at once from one address."""
    from braid.server.admission import TLS, Admission

    admission = Admission(per_source=32, total=1024, clock=FakeClock())
    dropped: list[int] = []
    for i in range(600):
        admission.admit("198.18.0.9", lambda i=i: dropped.append(i), lambda: TLS)
    assert dropped == [] and len(admission) == 600


def test_admission_total_takes_from_the_heaviest_source() -> None:
    from braid.server.admission import SILENT, TLS, Admission

    admission = Admission(per_source=8, total=10, clock=FakeClock())
    dropped: list[str] = []
    # The attacker shares the client's address: its silent connections go before the client's.
    admission.admit("198.18.0.66", lambda: dropped.append("client"), lambda: TLS)
    for i in range(7):
        admission.admit("198.18.0.66", lambda i=i: dropped.append(f"flood{i}"), lambda: SILENT)
    mine, _ = admission.admit("198.18.0.7", lambda: dropped.append("mine"))
    admission.admit("198.18.0.8", lambda: dropped.append("other"))
    for i in range(7):
        admission.admit(f"198.18.1.{i}", lambda i=i: dropped.append(f"new{i}"))
    assert len(admission) == 10
    assert dropped == [f"flood{i}" for i in range(7)]
    admission.release(mine)
    admission.release(mine)  # idempotent
    assert len(admission) == 9 and admission.dropped == 7


def test_admission_counts_an_ipv6_64_as_one_source() -> None:
    from braid.server.admission import CLOSED_OR_GARBAGE, Admission, source_key

    assert source_key("2001:db8:1:2::5") == source_key("2001:db8:1:2:ffff::1")
    admission = Admission(per_source=2, total=100, clock=FakeClock())
    dropped: list[int] = []
    for i in range(10):
        admission.admit(
            f"2001:db8:1:2::{i + 1:x}", lambda i=i: dropped.append(i), lambda: CLOSED_OR_GARBAGE
        )
    assert len(admission) == 2 and admission.sources() == 1
    assert dropped == list(range(8))


def test_admission_memory_is_bounded_and_released() -> None:
    from braid.server.admission import Admission

    admission = Admission(per_source=4, total=100, clock=FakeClock())
    entries = [
        admission.admit(f"198.18.{i // 256}.{i % 256}", lambda: None)[0] for i in range(5000)
    ]
    assert len(admission) == 100 and admission.sources() == 100
    for entry in entries:
        admission.release(entry)
    assert len(admission) == 0 and admission.sources() == 0


def test_admission_limits_follow_the_descriptor_limit() -> None:
    from braid.server.server import admission_for

    assert admission_for(None).total == 1024
    assert admission_for(1024).total == 128
    assert admission_for(64).total == 16
    assert admission_for(65536).total == 1024


def test_warnings_from_many_sources_are_capped_in_all(monkeypatch, caplog) -> None:
    clock = FakeClock()
    monkeypatch.setattr(server_module.time, "monotonic", clock)
    limiter = WarningLimiter(interval=10, max_lines=5)
    with caplog.at_level(logging.WARNING, logger="braid.server.server"):
        for i in range(1000):
            limiter.warn(f"2001:db8:{i:x}::1", "rejected: wrong token")
        clock.now += 11
        limiter.warn("198.18.0.1", "rejected: wrong token")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 7
    assert lines[5] == "995 more warnings from other addresses in the last 11 s were not logged"


def test_the_soft_limit_of_open_files_is_raised_to_the_hard_one() -> None:
    import subprocess
    import sys

    code = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))\n"
        "from braid.server.system import raise_descriptor_limit\n"
        "print(raise_descriptor_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.stdout.split() == ["4096", "4096"], done.stderr


def test_the_server_unit_sets_a_descriptor_limit() -> None:
    from braid.assets import get_asset

    unit = get_asset("systemd", "braid-server.service").read_text()
    assert "\nLimitNOFILE=65536\n" in unit
