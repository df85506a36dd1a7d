"""The command line's control client: a daemon too busy to accept is an error a user can read."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from braid.client import ControlClient, DaemonUnavailable


def test_a_full_backlog_is_a_clear_error_not_a_traceback(tmp_path: Path):
    path = str(tmp_path / "control.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)  # never accepted: the backlog fills at once
    filled = []
    try:
        for _ in range(8):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            if s.connect_ex(path) != 0:
                s.close()
                break
            filled.append(s)
        started = time.monotonic()
        with pytest.raises(DaemonUnavailable, match="too busy"):
            ControlClient(path, timeout=0.3)
        assert time.monotonic() - started < 2
    finally:
        for s in filled:
            s.close()
        listener.close()
