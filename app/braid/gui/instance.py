"""One tray per user: a second start hands its request to the first and leaves.

The first instance listens on a local socket named for the user (in $XDG_RUNTIME_DIR,
which only the user can enter, and restricted to the user besides). A later start sends
one line, "show dashboard", "show settings" or "dump PATH", and exits.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from PySide6.QtCore import QObject, Signal
from PySide6.QtNetwork import QLocalServer, QLocalSocket

log = logging.getLogger(__name__)


def instance_name(instance: str = "braid-tray") -> str:
    """The socket of ``instance`` for this user ("braid-tray", or another for a demo)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return str(Path(runtime) / f"{instance}.sock")
    return f"{instance}-{os.getuid()}"  # Qt puts it in its temp dir


def forward(message: str, name: str | None = None, timeout_ms: int = 1500) -> bool:
    """Hand ``message`` to a running tray; False when there is none."""
    sock = QLocalSocket()
    sock.connectToServer(name or instance_name())
    if not sock.waitForConnected(timeout_ms):
        return False
    sock.write(message.encode() + b"\n")
    sock.flush()
    sock.waitForBytesWritten(timeout_ms)
    sock.waitForReadyRead(timeout_ms)  # the first answers "ok" once it has acted
    sock.disconnectFromServer()
    return True


class SingleInstance(QObject):
    """The first instance's listener; ``message`` carries what a later start asked for."""

    message = Signal(str)

    def __init__(self, name: str | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.name = name or instance_name()
        self.server = QLocalServer(self)
        self.server.setSocketOptions(QLocalServer.SocketOption.UserAccessOption)
        self.server.newConnection.connect(self._accept)
        self._peers: set[QLocalSocket] = set()  # kept until they hang up

    def listen(self) -> bool:
        if self.server.listen(self.name):
            return True
        # A socket left by a tray that crashed: nobody answers on it, so take it over.
        QLocalServer.removeServer(self.name)
        if self.server.listen(self.name):
            return True
        log.warning("cannot listen on %s: %s", self.name, self.server.errorString())
        return False

    def _accept(self) -> None:
        while self.server.hasPendingConnections():
            sock = self.server.nextPendingConnection()
            self._peers.add(sock)
            sock.readyRead.connect(self._read)
            sock.disconnected.connect(self._forget)

    def _forget(self) -> None:
        sock = self.sender()
        if isinstance(sock, QLocalSocket) and sock in self._peers:
            self._peers.discard(sock)
            sock.deleteLater()

    def _read(self) -> None:
        sock = self.sender()
        if not isinstance(sock, QLocalSocket):
            return
        while sock.canReadLine():
            line = bytes(sock.readLine().data()).decode(errors="replace").strip()
            if line:
                self.message.emit(line)
                sock.write(b"ok\n")
                sock.flush()

    def close(self) -> None:
        for sock in list(self._peers):
            sock.abort()
        self.server.close()
