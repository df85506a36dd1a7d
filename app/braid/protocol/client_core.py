"""The control protocol's client side without I/O: bytes in, what they mean out.

The command line (:mod:`braid.client`, blocking sockets) and the tray (:mod:`braid.gui.client`,
Qt) both drive one :class:`ClientCore`: it numbers requests, remembers which command each one
was, splits the stream into lines, and tells answers from events and samples. They only move
bytes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from braid.protocol import control
from braid.protocol.control import ControlError, ErrorCode

#: A sample with many links is bigger than one request.
MAX_INCOMING_LINE = control.MAX_LINE * 16


@dataclass(frozen=True)
class Reply:
    id: int
    cmd: str
    ok: bool
    result: Any = None
    code: str = ""
    message: str = ""

    def unwrap(self) -> Any:
        """The result, or the error raised as a ControlError."""
        if self.ok:
            return self.result
        raise ControlError(self.code, self.message)


@dataclass(frozen=True)
class Pushed:
    """An event or the 1 Hz sample, pushed to a subscriber."""

    message: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.message.get("event"))


@dataclass(frozen=True)
class Progress:
    """How a pending request is getting on; its answer is still to come."""

    id: int
    cmd: str
    news: dict[str, Any]


@dataclass(frozen=True)
class Garbage:
    """Something the daemon sent that this client cannot read."""

    code: str
    message: str


@dataclass
class ClientCore:
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    pending: dict[int, str] = field(default_factory=dict)
    _buffer: bytearray = field(default_factory=bytearray)

    def request(self, cmd: str, **args: Any) -> tuple[int, bytes]:
        """A new request: its id and the bytes to send."""
        request_id = next(self._ids)
        self.pending[request_id] = cmd
        return request_id, control.encode({"id": request_id, "cmd": cmd, **args})

    def lost(self) -> list[int]:
        """The connection is gone: the requests that will never be answered."""
        pending, self.pending = self.pending, {}
        self._buffer.clear()
        return list(pending)

    def receive(self, data: bytes) -> list[Reply | Progress | Pushed | Garbage]:
        """Bytes from the daemon: what the complete lines among them say."""
        self._buffer += data
        out: list[Reply | Progress | Pushed | Garbage] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_INCOMING_LINE:
                    self._buffer.clear()
                    out.append(Garbage(ErrorCode.BAD_REQUEST, "the daemon sent an overlong line"))
                return out
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            if line.strip():
                item = self.line(line)
                if item is not None:
                    out.append(item)

    def line(self, line: bytes) -> Reply | Progress | Pushed | Garbage | None:
        """One line: a reply to a pending request, its progress, a pushed message, garbage, or
        None (a reply to nothing this client asked)."""
        try:
            message = control.decode_reply(line)
        except ControlError as exc:
            return Garbage(exc.code, exc.message)
        if message.get("event") is not None:
            return Pushed(message)
        request_id = message.get("id")
        if not isinstance(request_id, int) or request_id not in self.pending:
            return None
        if isinstance(message.get("progress"), dict):
            return Progress(request_id, self.pending[request_id], message["progress"])
        cmd = self.pending.pop(request_id)
        if message.get("ok"):
            return Reply(request_id, cmd, True, message.get("result"))
        error = message.get("error") or {}
        return Reply(
            request_id,
            cmd,
            False,
            code=str(error.get("code", ErrorCode.FAILED)),
            message=str(error.get("message", "the request failed")),
        )


__all__ = ["ClientCore", "Garbage", "Progress", "Pushed", "Reply"]
