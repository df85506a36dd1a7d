"""A blocking client for the daemon's control socket (used by the command line)."""

from __future__ import annotations

import itertools
import os
import socket
import time
from typing import Any

from braid.protocol import control
from braid.protocol.control import ControlError


class DaemonUnavailable(ConnectionError):
    """No daemon answers on the control socket."""


def default_control_path() -> str:
    return os.environ.get("BRAID_CONTROL", control.DEFAULT_SOCKET)


class ControlClient:
    def __init__(self, path: str | None = None, timeout: float = 30.0) -> None:
        self.path = path or default_control_path()
        self._ids = itertools.count(1)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._connect(min(timeout, 5.0))
        except FileNotFoundError:
            self._sock.close()
            raise DaemonUnavailable(
                f"the Braid daemon is not running (no control socket at {self.path}); "
                "start it with: systemctl start braidd   (or: braid daemon)"
            ) from None
        except ConnectionRefusedError:
            self._sock.close()
            raise DaemonUnavailable(
                f"the Braid daemon is not answering on {self.path}: it may have crashed; "
                "see: journalctl -u braidd"
            ) from None
        except PermissionError:
            self._sock.close()
            raise DaemonUnavailable(f"not allowed to open {self.path}") from None
        self._file = self._sock.makefile("rb")

    def _connect(self, patience: float) -> None:
        # A full backlog answers EAGAIN at once (a socket with a timeout does not wait).
        deadline = time.monotonic() + patience
        while True:
            try:
                self._sock.connect(self.path)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self._sock.close()
                    raise DaemonUnavailable(
                        f"the Braid daemon is too busy to answer on {self.path}; "
                        "see: journalctl -u braidd"
                    ) from None
                time.sleep(0.02)

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stream(self):
        """Messages the daemon pushes (after ``subscribe``), until it closes the connection."""
        self._sock.settimeout(None)
        while True:
            line = self._file.readline(control.MAX_LINE * 16)
            if not line:
                raise DaemonUnavailable("the Braid daemon closed the connection")
            yield control.decode_reply(line)

    def call(self, cmd: str, **args: Any) -> Any:
        """Send one request and return its result; raises ControlError on an error reply."""
        request_id = next(self._ids)
        self._sock.sendall(control.encode({"id": request_id, "cmd": cmd, **args}))
        while True:
            line = self._file.readline(control.MAX_LINE * 16)
            if not line:
                raise DaemonUnavailable("the Braid daemon closed the connection")
            reply = control.decode_reply(line)
            if reply.get("id") != request_id:
                continue  # an event of a subscription, not our answer
            if reply.get("ok"):
                return reply.get("result")
            error = reply.get("error") or {}
            raise ControlError(error.get("code", "failed"), error.get("message", "failed"))
