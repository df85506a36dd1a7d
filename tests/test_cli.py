"""The braid command: where `braid up` takes the pairing URI from, and what it sends braidd.

A small control socket in a thread stands in for braidd and records the requests it gets.
"""

from __future__ import annotations

import io
import json
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from braid import cli
from braid.protocol import control

URI = "braid://vps.example.org:7443?fp=" + "ab" * 32 + "&token=" + "T" * 43
STATUS = {"state": "connected", "server": "vps.example.org:7443", "socks": "127.0.0.1:1080"}


@pytest.fixture
def braidd(tmp_path: Path) -> Iterator[tuple[str, list[dict]]]:
    """A control socket that answers every request with a status; the requests it got."""
    path = str(tmp_path / "control.sock")
    requests: list[dict] = []
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    listener.settimeout(10)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as lines:
                for line in lines:
                    request = json.loads(line)
                    requests.append(request)
                    conn.sendall(control.ok(request.get("id"), STATUS))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path, requests
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        listener.close()
        thread.join(5)


def up(path: str, *argv: str) -> int:
    return cli.main(["--control", path, "up", *argv])


def test_the_uri_comes_from_stdin(braidd, monkeypatch, capsys):
    path, requests = braidd
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"\n  {URI}  \n"))
    assert up(path, "--pairing", "-") == 0
    assert requests[-1]["cmd"] == "up" and requests[-1]["pairing"] == URI
    assert "warning" not in capsys.readouterr().err


def test_the_uri_comes_from_a_file(braidd, tmp_path: Path, capsys):
    path, requests = braidd
    saved = tmp_path / "pairing.txt"
    saved.write_text(f"{URI}\n")
    assert up(path, "--pairing-file", str(saved), "--mode", "system") == 0
    assert requests[-1]["pairing"] == URI and requests[-1]["mode"] == "system"
    assert "warning" not in capsys.readouterr().err


def test_the_uri_is_asked_for_without_echo_on_a_terminal(braidd, monkeypatch):
    path, requests = braidd
    asked = []

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr("getpass.getpass", lambda prompt: asked.append(prompt) or URI)
    assert up(path, "--pairing", "-") == 0
    assert asked and "Pairing URI" in asked[0]
    assert requests[-1]["pairing"] == URI


def test_a_token_on_the_command_line_works_but_is_warned_about(braidd, capsys):
    path, requests = braidd
    assert up(path, "--pairing", URI) == 0
    assert requests[-1]["pairing"] == URI
    err = capsys.readouterr().err
    assert "warning" in err and "--pairing-file" in err
    assert "T" * 43 not in err  # the warning does not repeat the token


def test_without_a_uri_the_last_pairing_is_used(braidd, capsys):
    path, requests = braidd
    assert up(path) == 0
    assert "pairing" not in requests[-1]
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda tmp: ["--pairing-file", str(tmp / "missing")], "cannot read"),
        (lambda tmp: ["--pairing-file", str(tmp)], "cannot read"),
        (lambda tmp: ["--pairing-file", str(tmp / "empty")], "holds no pairing URI"),
        (lambda tmp: ["--pairing", "-"], "no pairing URI on stdin"),
    ],
)
def test_a_missing_uri_is_a_clear_error_and_nothing_is_sent(
    braidd, tmp_path: Path, monkeypatch, capsys, setup, message
):
    path, requests = braidd
    (tmp_path / "empty").write_text("\n\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert up(path, *setup(tmp_path)) == 2
    assert message in capsys.readouterr().err
    assert requests == []


def test_a_huge_or_wrong_file_is_refused_without_reading_it_whole(braidd, tmp_path: Path, capsys):
    path, requests = braidd
    huge = tmp_path / "huge"
    with open(huge, "wb") as f:
        f.truncate(1 << 30)  # sparse: a gigabyte of NULs, no line end
    assert up(path, "--pairing-file", str(huge)) == 2
    wrong = tmp_path / "wrong"
    wrong.write_text(URI.split("&token=")[0] + "\n")
    assert up(path, "--pairing-file", str(wrong)) == 2
    assert "no token" in capsys.readouterr().err
    assert requests == []


def test_two_sources_at_once_are_refused(braidd, tmp_path: Path):
    path, _ = braidd
    with pytest.raises(SystemExit) as exit_:
        up(path, "--pairing", "-", "--pairing-file", str(tmp_path / "x"))
    assert exit_.value.code == 2


def test_status_shows_a_link_behind_a_captive_portal_as_sign_in_required() -> None:
    link = {
        "name": "wlan0",
        "kind": "wifi",
        "priority": "always",
        "effective_priority": "always",
        "state": "up",
        "alive": None,
        "rtt_ms": None,
        "loss": None,
        "rx_bps": 0,
        "tx_bps": 0,
        "used_bytes": 0,
        "cap": None,
        "connectivity": "portal",
    }
    text = cli.render_links([link])
    assert "sign-in required" in text.splitlines()[1]
    assert "dead" not in text
    assert "sign in" in text.splitlines()[-1]
    assert "sign-in required" not in cli.render_links([{**link, "connectivity": "full"}])
