"""braidd that cannot start says why in one line, exits 1, and leaves the namespace as it was."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns


@pytest.fixture
def netns(empty_netns: str) -> str:
    return empty_netns


@pytest.fixture
def read_only(tmpfs) -> Path:
    return tmpfs(read_only=True)


def braidd(netns: str, *argv: str, before: str = "") -> subprocess.CompletedProcess[str]:
    """Run braidd in ``netns`` (after the Python statements ``before``, e.g. taking a port)."""
    script = (
        f"import sys, socket\n{before}\nfrom braid.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", script, *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def state(netns: str) -> str:
    show = ["ip", "netns", "exec", netns]
    return "".join(
        subprocess.run([*show, *argv], capture_output=True, text=True, check=False).stdout
        for argv in (["ip", "rule"], ["ip", "mptcp", "endpoint"], ["ip", "mptcp", "limits"])
    )


def one_clear_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, done.stderr
    for word in words:
        assert word in errors[0], errors[0]


def test_unwritable_state_directory(netns: str, read_only: Path, tmp_path: Path) -> None:
    before = state(netns)
    done = braidd(
        netns, "--control", str(tmp_path / "c.sock"), "daemon", "--state-dir", str(read_only / "s")
    )
    one_clear_error(done, "cannot use the state directory", "Read-only file system", "--state-dir")
    assert state(netns) == before


def test_control_socket_that_cannot_be_made(netns: str, read_only: Path, tmp_path: Path) -> None:
    before = state(netns)
    done = braidd(
        netns, "--control", str(read_only / "c.sock"), "daemon", "--state-dir", str(tmp_path / "s")
    )
    one_clear_error(done, "cannot create the control socket", "--control")
    assert state(netns) == before  # the limits it raised on the way are back


def test_socks_port_in_use(netns: str, tmp_path: Path) -> None:
    before = state(netns)
    taken = "s = socket.socket(); s.bind(('127.0.0.1', 1080)); s.listen()"
    done = braidd(
        netns,
        "--control",
        str(tmp_path / "c.sock"),
        "daemon",
        "--state-dir",
        str(tmp_path / "s"),
        before=taken,
    )
    one_clear_error(done, "cannot listen for SOCKS5 on 127.0.0.1:1080", "--socks")
    assert state(netns) == before
