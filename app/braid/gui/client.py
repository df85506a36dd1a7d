"""The tray's connection to braidd: Qt signals in, requests out, reconnecting by itself.

One QLocalSocket to the control socket (docs/control-api.md). On every (re)connection the
client subscribes, so the views get a status at once and then a sample a second. Nothing
here blocks the event loop, and nothing here knows about widgets.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from PySide6.QtCore import QObject, QTimer, Signal
from PySide6.QtNetwork import QLocalSocket

from braid.protocol.client_core import ClientCore, Garbage, Progress, Pushed, Reply
from braid.protocol.control import ErrorCode

log = logging.getLogger(__name__)

START_HINT = "start it: sudo systemctl start braidd"
GROUP_HINT = "you are not in the braid group: sudo usermod -aG braid $USER, then log in again"
DISCONNECTED = "disconnected"  # the error code of requests that the lost connection took along

# Growing pauses between attempts: quick when the daemon merely restarts, gentle when it is off.
RETRY_DELAYS = (0.25, 0.5, 1.0, 2.0, 3.0)


def friendly_error(code: str, message: str) -> str:
    """The daemon's message, or what to do about it where the user can do something."""
    if code == ErrorCode.FORBIDDEN:
        return f"Not allowed: {GROUP_HINT}."
    return message


class DaemonClient(QObject):
    """Talks to braidd over its control socket; every answer and event arrives as a signal."""

    connected = Signal()
    disconnected = Signal(str)  # why, in words a user can act on
    status = Signal(dict)  # a full status object (after subscribe, up, down or status)
    sample = Signal(dict)  # the 1 Hz sample event
    event = Signal(dict)  # every other event: link-lost, failover, ...
    error = Signal(str, str)  # code, message for people
    reply = Signal(int, bool, object)  # request id, ok, result or {"code", "message"}
    progress = Signal(int, dict)  # request id, how a long request is getting on (speed-test)

    def __init__(
        self,
        path: str,
        parent: QObject | None = None,
        retry_delays: tuple[float, ...] = RETRY_DELAYS,
        stall_after: float = 6.0,
    ) -> None:
        super().__init__(parent)
        self.path = path
        self._retry_delays = retry_delays
        self._stall_after = stall_after
        self._core = ClientCore()
        self._attempt = 0
        self._subscribed = False
        self._last_message = 0.0
        self._stopped = True
        self.is_connected = False
        self.last_reason = ""
        self._socket = QLocalSocket(self)
        self._socket.connected.connect(self._on_connected)
        self._socket.disconnected.connect(self._on_socket_closed)
        self._socket.errorOccurred.connect(self._on_socket_error)
        self._socket.readyRead.connect(self._read)
        self._retry = QTimer(self)
        self._retry.setSingleShot(True)
        self._retry.timeout.connect(self._open)
        # A daemon that is stopped (SIGSTOP, hung) keeps its socket open: notice the silence.
        self._watchdog = QTimer(self)
        self._watchdog.setInterval(1000)
        self._watchdog.timeout.connect(self._check_alive)

    # -- connection -------------------------------------------------------------

    def start(self) -> None:
        """Connect now, and keep reconnecting until stop()."""
        self._stopped = False
        self._open()

    def stop(self) -> None:
        self._stopped = True
        self._retry.stop()
        self._watchdog.stop()
        self.is_connected = False
        self._socket.abort()
        self._fail_pending("the tray is closing")

    def _open(self) -> None:
        if self._stopped:
            return
        if self._socket.state() != QLocalSocket.LocalSocketState.UnconnectedState:
            self._socket.abort()
        self._socket.connectToServer(self.path)

    def _on_connected(self) -> None:
        self._attempt = 0
        self.is_connected = True
        self.last_reason = ""
        self._subscribed = False
        self._last_message = time.monotonic()
        log.info("connected to braidd at %s", self.path)
        self._send("subscribe")
        self._watchdog.start()
        self.connected.emit()

    def _on_socket_error(self, socket_error: QLocalSocket.LocalSocketError) -> None:
        errors = QLocalSocket.LocalSocketError
        if socket_error == errors.PeerClosedError:
            return  # the disconnected signal tells the rest
        if socket_error == errors.ServerNotFoundError:
            reason = f"Braid's daemon is not running ({START_HINT})"
        elif socket_error == errors.ConnectionRefusedError:
            reason = f"Braid's daemon is not answering ({START_HINT})"
        elif socket_error == errors.SocketAccessError:
            reason = f"Not allowed to reach Braid's daemon: {GROUP_HINT}"
        else:
            reason = f"Lost Braid's daemon: {self._socket.errorString()} ({START_HINT})"
        log.debug("control socket %s: %s", self.path, self._socket.errorString())
        if self.is_connected:
            self._lost(reason)
        else:
            self._attempt_failed(reason)

    def _on_socket_closed(self) -> None:
        if self.is_connected:
            self._lost(
                f"The Braid daemon stopped (or restarted); reconnecting… If it does not come back, {START_HINT}"
            )

    def _lost(self, reason: str) -> None:
        self.is_connected = False
        self._watchdog.stop()
        self._fail_pending(reason)
        self._announce(reason, force=True)
        self._schedule()

    def _attempt_failed(self, reason: str) -> None:
        self._announce(reason)
        self._schedule()

    def _announce(self, reason: str, force: bool = False) -> None:
        """Say why once, not at every retry: the tray would flicker with the same message."""
        if force or reason != self.last_reason:
            self.last_reason = reason
            log.info("%s", reason)
            self.disconnected.emit(reason)

    def _schedule(self) -> None:
        if self._stopped or self._retry.isActive():
            return
        delay = self._retry_delays[min(self._attempt, len(self._retry_delays) - 1)]
        self._attempt += 1
        self._retry.start(int(delay * 1000))

    def _check_alive(self) -> None:
        if self.is_connected and time.monotonic() - self._last_message > self._stall_after:
            reason = (
                f"Braid's daemon stopped answering (nothing for {self._stall_after:.0f} s); "
                "reconnecting (if it stays silent: sudo systemctl restart braidd)"
            )
            self._lost(reason)
            self._socket.abort()

    # -- requests ---------------------------------------------------------------

    def request_status(self) -> int:
        return self._send("status")

    def up(self, pairing: str | None = None) -> int:
        """Connect the tunnel; with ``pairing`` (a braid:// URI) to that server."""
        return self._send("up", **({"pairing": pairing} if pairing else {}))

    def down(self) -> int:
        return self._send("down")

    def test_pairing(self, pairing: str | None = None) -> int:
        """Open one tunnel with ``pairing`` (or the saved one) and close it: nothing changes."""
        return self._send("test-pairing", **({"pairing": pairing} if pairing else {}))

    def links(self) -> int:
        return self._send("links")

    def set_link(self, name: str, **changes: Any) -> int:
        return self._send("set-link", link=name, **changes)

    def interfaces(self) -> int:
        return self._send("interfaces")

    def add_link(self, name: str, kind: str | None = None) -> int:
        return self._send("add-link", link=name, **({"kind": kind} if kind else {}))

    def remove_link(self, name: str) -> int:
        return self._send("remove-link", link=name)

    def set_order(self, names: list[str]) -> int:
        return self._send("set-order", links=list(names))

    def get_settings(self) -> int:
        return self._send("get-settings")

    def set_settings(self, values: dict[str, Any]) -> int:
        return self._send("set-settings", settings=dict(values))

    def doctor(self) -> int:
        """Ask braidd to check every link (it answers within about 7 s)."""
        return self._send("doctor")

    def speed_test(self) -> int:
        """Measure each link and all of them bonded (within 30 s; progress signals meanwhile)."""
        return self._send("speed-test")

    def _send(self, cmd: str, **args: Any) -> int:
        request_id, data = self._core.request(cmd, **args)
        if not self.is_connected:
            self._core.pending.pop(request_id, None)
            reason = self.last_reason or f"Braid's daemon is not connected ({START_HINT})"
            # Answer later, as a real reply would come: callers connect to reply after sending.
            QTimer.singleShot(0, lambda: self._answer_failed(request_id, DISCONNECTED, reason))
            return request_id
        self._socket.write(data)
        return request_id

    def _answer_failed(self, request_id: int, code: str, message: str) -> None:
        self.error.emit(code, message)
        self.reply.emit(request_id, False, {"code": code, "message": message})

    def _fail_pending(self, reason: str) -> None:
        for request_id in self._core.lost():
            self.reply.emit(request_id, False, {"code": DISCONNECTED, "message": reason})

    # -- answers and events -----------------------------------------------------

    def _read(self) -> None:
        data = bytes(self._socket.readAll().data())
        if data:
            self._last_message = time.monotonic()
        for item in self._core.receive(data):
            if isinstance(item, Garbage):
                if "overlong" in item.message:
                    self._lost("Braid's daemon sent a line too long to be a message; reconnecting")
                    self._socket.abort()
                    return
                log.warning("ignoring a message from braidd: %s", item.message)
                self.error.emit(item.code, item.message)
            elif isinstance(item, Pushed):
                (self.sample if item.kind == "sample" else self.event).emit(item.message)
            elif isinstance(item, Progress):
                self.progress.emit(item.id, item.news)
            else:
                self._answered(item)

    def _answered(self, reply: Reply) -> None:
        if reply.ok:
            result = reply.result
            if reply.cmd == "subscribe" and isinstance(result, dict):
                self._subscribed = True
                self.status.emit(result.get("status") or {})
            elif reply.cmd in ("status", "up", "down") and isinstance(result, dict):
                self.status.emit(result)
            elif reply.cmd in ("set-link", "add-link", "remove-link", "set-order", "set-settings"):
                self.request_status()  # links changed: let every view see the new state now
            self.reply.emit(reply.id, True, result)
            return
        text = friendly_error(reply.code, reply.message)
        self.error.emit(reply.code, text)
        self.reply.emit(reply.id, False, {"code": reply.code, "message": text})
