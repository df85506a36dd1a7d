"""The path manager's sysctl (on a made-up /proc/sys/net/mptcp) and its socket queries (on a
real loopback MPTCP connection); no root needed."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from braid.daemon.routing import paths
from braid.daemon.routing.paths import PathManager, PathManagerUnavailable
from braid.transport import IPPROTO_MPTCP


class NoNetlink(PathManager):
    """The sysctl part only: no netlink socket is opened."""

    def _open(self):  # type: ignore[override]
        return None


@pytest.fixture
def sysctl(tmp_path: Path) -> Path:
    d = tmp_path / "sys"
    d.mkdir()
    (d / "path_manager").write_text("kernel\n")
    return d


def test_enable_records_the_old_value_and_restore_puts_it_back(sysctl, tmp_path) -> None:
    state = tmp_path / "state"
    manager = NoNetlink(state, sysctl)
    manager.enable()
    assert (sysctl / "path_manager").read_text() == "userspace"
    assert json.loads((state / paths.PM_FILE).read_text()) == {
        "file": "path_manager",
        "value": "kernel",
    }
    assert manager.active
    manager.restore()
    assert (sysctl / "path_manager").read_text() == "kernel"
    assert not (state / paths.PM_FILE).exists()
    assert not manager.active


def test_a_crashed_runs_record_keeps_the_true_original(sysctl, tmp_path) -> None:
    state = tmp_path / "state"
    NoNetlink(state, sysctl).enable()  # crashes without restoring
    NoNetlink(state, sysctl).enable()  # the next start finds userspace already set
    PathManager(state, sysctl).restore()  # the cleanup after it
    assert (sysctl / "path_manager").read_text() == "kernel"


def test_older_kernels_use_pm_type(tmp_path) -> None:
    d = tmp_path / "sys"
    d.mkdir()
    (d / "pm_type").write_text("0\n")
    manager = NoNetlink(tmp_path / "state", d)
    manager.enable()
    assert (d / "pm_type").read_text() == "1"
    manager.restore()
    assert (d / "pm_type").read_text() == "0"


def test_a_kernel_without_the_userspace_path_manager_says_so(tmp_path) -> None:
    with pytest.raises(PathManagerUnavailable, match="no userspace MPTCP path manager"):
        NoNetlink(tmp_path, tmp_path).enable()


def test_a_damaged_record_is_reported_and_dropped(sysctl, tmp_path, caplog) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / paths.PM_FILE).write_text('{"file": "../../etc/passwd", "value": "x"}')
    with caplog.at_level(logging.WARNING):
        PathManager(state, sysctl).restore()
    assert "damaged" in caplog.text
    assert (sysctl / "path_manager").read_text() == "kernel\n"
    assert not (state / paths.PM_FILE).exists()


@pytest.fixture
def mptcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    try:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    except OSError:
        pytest.skip("this kernel has no MPTCP")
    with listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
    with client, server:
        yield client, server


def test_token_and_subflows_of_a_real_connection(mptcp_pair) -> None:
    client, server = mptcp_pair
    assert paths.token(client) is not None
    assert paths.token(server) is not None
    (only,) = paths.subflows(client)
    assert only.local == client.getsockname()
    assert only.remote == client.getpeername()


def test_plain_tcp_has_no_token_and_no_subflows() -> None:
    with socket.socket() as plain:
        assert paths.token(plain) is None
        assert paths.subflows(plain) == []
    closed = socket.socket()
    closed.close()
    assert paths.subflows(closed) == []
