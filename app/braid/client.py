"""A blocking client for the daemon's control socket (used by the command line).

It only moves bytes; :class:`braid.protocol.client_core.ClientCore` reads them, as it does
for the tray.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

from braid.protocol import control
from braid.protocol.client_core import ClientCore, Garbage, Progress, Pushed, Reply
from braid.protocol.control import ControlError


class DaemonUnavailable(ConnectionError):
    """No daemon answers on the control socket."""


def default_control_path() -> str:
    return os.environ.get("BRAID_CONTROL", control.DEFAULT_SOCKET)


class ControlClient:
    def __init__(self, path: str | None = None, timeout: float = 30.0) -> None:
        self.path = path or default_control_path()
        self._core = ClientCore()
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
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _incoming(self):
        """What the daemon says, item by item, until it closes the connection."""
        while True:
            data = self._sock.recv(1 << 16)
            if not data:
                raise DaemonUnavailable("the Braid daemon closed the connection")
            for item in self._core.receive(data):
                if isinstance(item, Garbage):
                    raise ControlError(item.code, item.message)
                yield item

    def stream(self):
        """Messages the daemon pushes (after ``subscribe``), until it closes the connection."""
        self._sock.settimeout(None)
        for item in self._incoming():
            if isinstance(item, Pushed):
                yield item.message

    def call(self, cmd: str, on_progress: Callable[[dict], None] | None = None, **args: Any) -> Any:
        """Send one request and return its result; raises ControlError on an error reply.

        ``on_progress`` is told what the daemon says of a long request before it answers."""
        request_id, data = self._core.request(cmd, **args)
        self._sock.sendall(data)
        for item in self._incoming():
            if isinstance(item, Reply) and item.id == request_id:
                return item.unwrap()
            if isinstance(item, Progress) and item.id == request_id and on_progress is not None:
                on_progress(item.news)
        raise DaemonUnavailable("the Braid daemon closed the connection")  # pragma: no cover
