"""braid-server init and show, and the state directory they write (no network involved)."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from braid.protocol.pairing import parse_pairing
from braid.server.cli import main
from braid.server.state import (
    Device,
    ServerConfig,
    StateDir,
    StateError,
    check_public_host,
    hash_token,
    parse_listen,
    token_matches,
)
from braid.transport import fingerprint


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def files(state: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in state.iterdir()}


def test_init_writes_the_state_and_prints_the_uri_last(tmp_path: Path, capsys) -> None:
    state = tmp_path / "state"
    code, out, _ = run(
        capsys, "init", "--state-dir", str(state), "--listen", "[::]:7443",
        "--public-host", "vps.example.org",
    )  # fmt: skip
    assert code == 0
    pairing = parse_pairing(out.strip().splitlines()[-1])
    assert (pairing.host, pairing.port) == ("vps.example.org", 7443)

    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "server.json").stat().st_mode) == 0o600
    assert sorted(p.name for p in state.iterdir()) == ["cert.pem", "key.pem", "server.json"]

    config = json.loads((state / "server.json").read_text())
    assert config["format"] == 2
    assert config["listen"] == "[::]:7443"
    assert config["public_host"] == "vps.example.org"
    [device] = config["devices"]
    assert device["name"] == "first-device"
    assert device["token_sha256"] == hashlib.sha256(pairing.token.encode()).hexdigest()
    assert pairing.token not in (state / "server.json").read_text()
    assert config["policy"] == {"allow": [], "deny": []}
    assert config["timeouts"] == {
        "handshake": 10.0,
        "idle": 300.0,
        "connect": 10.0,
        "udp_idle": 120.0,
    }

    cert = x509.load_pem_x509_certificate((state / "cert.pem").read_bytes())
    assert fingerprint(cert.public_bytes(Encoding.DER)) == pairing.fingerprint
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["vps.example.org"]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.days >= 3649
    # Nothing tells a scanner what serves: the subject is the host name alone.
    assert cert.subject.rfc4514_string() == "CN=vps.example.org" == cert.issuer.rfc4514_string()
    assert b"braid" not in cert.public_bytes(Encoding.DER).lower()


def test_listen_address_is_the_host_when_not_a_wildcard(tmp_path: Path, capsys) -> None:
    state = str(tmp_path / "s")
    code, out, _ = run(capsys, "init", "--state-dir", state, "--listen", "[2001:db8::7]:443")
    assert code == 0
    uri = out.strip().splitlines()[-1]
    assert uri.startswith("braid://[2001:db8::7]:443?fp=")
    cert = x509.load_pem_x509_certificate((tmp_path / "s" / "cert.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["2001:db8::7"]


def test_wildcard_without_public_host_is_a_clear_error(tmp_path: Path, capsys) -> None:
    for listen in ("0.0.0.0:7443", "[::]:7443"):
        code, _, err = run(capsys, "init", "--state-dir", str(tmp_path / "s"), "--listen", listen)
        assert code == 1
        assert "--public-host" in err and err.count("\n") == 1
        assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("listen", ["7443", "host:7443", "1.2.3.4:0", "::1:7443", "[::1]:x"])
def test_bad_listen_is_a_clear_error(tmp_path: Path, capsys, listen: str) -> None:
    code, _, err = run(capsys, "init", "--state-dir", str(tmp_path / "s"), "--listen", listen)
    assert code == 1
    assert err.startswith("braid-server: ") and err.count("\n") == 1


def test_second_init_changes_nothing_and_prints_no_token(tmp_path: Path, capsys) -> None:
    state = tmp_path / "state"
    _, first, _ = run(capsys, "init", "--state-dir", str(state), "--listen", "192.0.2.1:7443")
    before = files(state)
    code, out, _ = run(capsys, "init", "--state-dir", str(state), "--listen", "192.0.2.9:9")
    assert code == 0
    assert files(state) == before
    assert "already initialised" in out
    assert "--new-token" in out
    assert "token=" not in out and "braid://" not in out
    assert parse_pairing(first.strip().splitlines()[-1]).fingerprint in out


def test_new_token_replaces_only_the_token(tmp_path: Path, capsys) -> None:
    state = tmp_path / "state"
    _, first, _ = run(capsys, "init", "--state-dir", str(state), "--listen", "192.0.2.1:7443")
    old = parse_pairing(first.strip().splitlines()[-1])
    before = files(state)
    code, out, _ = run(capsys, "init", "--state-dir", str(state), "--new-token")
    assert code == 0
    new = parse_pairing(out.strip().splitlines()[-1])
    assert (new.host, new.port, new.fingerprint) == (old.host, old.port, old.fingerprint)
    assert new.token != old.token
    after = files(state)
    assert after["cert.pem"] == before["cert.pem"] and after["key.pem"] == before["key.pem"]
    [device] = StateDir(state).load().devices
    assert token_matches(new.token.encode(), device.token_sha256)
    assert not token_matches(old.token.encode(), device.token_sha256)


def test_show(tmp_path: Path, capsys) -> None:
    state = tmp_path / "state"
    _, first, _ = run(capsys, "init", "--state-dir", str(state), "--listen", "192.0.2.1:7443")
    pairing = parse_pairing(first.strip().splitlines()[-1])
    code, out, _ = run(capsys, "show", "--state-dir", str(state))
    assert code == 0
    assert f"fingerprint: {pairing.fingerprint}" in out
    assert "host: 192.0.2.1" in out and "port: 7443" in out
    assert pairing.token not in out


def test_show_on_a_missing_dir_is_one_line(tmp_path: Path, capsys) -> None:
    code, _, err = run(capsys, "show", "--state-dir", str(tmp_path / "nope"))
    assert code == 1
    assert "not initialised" in err and "braid-server init" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": 99}, "format 99"),
        ({"listen": "nonsense"}, "expected ADDRESS:PORT"),
        ({"devices": [{"name": "a", "token_sha256": "abc"}]}, "token_sha256 must be 64"),
        ({"devices": [{"name": "a b", "token_sha256": "ab" * 32}]}, "not a device name"),
        ({"devices": "x"}, "devices must be a list"),
        (
            {
                "devices": [
                    {"name": "A", "token_sha256": "ab" * 32},
                    {"name": "a", "token_sha256": "cd" * 32},
                ]
            },
            "same name",
        ),
        ({"format": 1, "token_sha256": "abc"}, "token_sha256"),
        ({"policy": {"allow": ["x"]}}, "allow: 'x'"),
        ({"timeouts": {"idle": -1}}, "timeouts.idle"),
        # Found by the fuzzer (tests/fuzz): NaN passed "<= 0" and broke asyncio's timers,
        # a 400-digit integer raised OverflowError instead of StateError.
        ({"timeouts": {"idle": float("nan")}}, "timeouts.idle"),
        ({"timeouts": {"connect": float("inf")}}, "timeouts.connect"),
        ({"timeouts": {"handshake": 10**400}}, "timeouts.handshake"),
    ],
)
def test_invalid_config_names_the_setting(
    tmp_path: Path, capsys, change: dict, message: str
) -> None:
    state = tmp_path / "state"
    run(capsys, "init", "--state-dir", str(state), "--listen", "192.0.2.1:7443")
    path = state / "server.json"
    config = json.loads(path.read_text())
    config.update(change)
    path.write_text(json.dumps(config))
    with pytest.raises(StateError, match=message):
        StateDir(state).load()
    code, _, err = run(capsys, "show", "--state-dir", str(state))
    assert code == 1 and message.split("'")[0] in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"format": 1, "public_host": "caf\xe9"}', "not UTF-8"),  # found by the fuzzer
        (b"[" * 100_000, "nested too deeply"),  # json.loads raised RecursionError
    ],
)
def test_unparsable_config_is_a_state_error(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "server.json").write_bytes(content)
    with pytest.raises(StateError, match=message):
        StateDir(tmp_path).load()


def test_config_round_trip() -> None:
    devices = [Device("laptop", hash_token("t" * 43), "2026-01-01T00:00:00+00:00")]
    config = ServerConfig("::", 7443, "vps.example.org", devices, ["10.0.0.0/8"], [])
    assert ServerConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


def test_parse_listen_and_public_host() -> None:
    assert parse_listen("[::]:7443") == ("::", 7443)
    assert parse_listen("0.0.0.0:1") == ("0.0.0.0", 1)
    assert parse_listen("[2001:DB8::1]:443") == ("2001:db8::1", 443)
    assert check_public_host("[2001:db8::1]") == "2001:db8::1"
    assert check_public_host("VPS.Example.org.") == "vps.example.org"
    for bad in ("bad host", "0.0.0.0", "-x.org", "1.2.3"):
        with pytest.raises(ValueError):
            check_public_host(bad)
