"""What the tray knows and decides, apart from how it is shown.

The session turns the daemon client's signals into one state (the tray icon's), the
links, a short log and the notifications worth a bubble; it connects and disconnects
with the saved pairing. Views (tray, dashboard, settings) only read it and call it:
nothing here touches a widget, so tests drive it without any window.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from PySide6.QtCore import QObject, Signal

from braid.gui.client import DISCONNECTED, DaemonClient
from braid.gui.colours import LinkColours
from braid.gui.graphs import RateHistory
from braid.gui.preferences import Preferences
from braid.gui.tokens import TokenStore
from braid.protocol.events import EventKind
from braid.protocol.pairing import Pairing
from braid.units import format_duration, format_rate

log = logging.getLogger(__name__)


class TrayState(StrEnum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DEGRADED = "degraded"
    ERROR = "error"


STATE_LABELS = {
    TrayState.DISCONNECTED: "Disconnected",
    TrayState.CONNECTING: "Connecting…",
    TrayState.CONNECTED: "Connected",
    TrayState.DEGRADED: "Connected, a link is down",
    TrayState.ERROR: "Not working",
}

# Events that deserve a bubble: a change the user feels (or pays for), not routine.
NOTIFY_TITLES = {str(kind): kind.title for kind in EventKind if kind.notify}
LOG_SIZE = 200


@dataclass(frozen=True)
class LogEntry:
    t: float
    kind: str
    link: str | None
    message: str
    level: str = "info"  # info | warning | error: how the log colours it


_EVENT_LEVELS = {str(kind): str(kind.level) for kind in EventKind if kind.level != "info"}


class Session(QObject):
    changed = Signal()  # status, links or state moved: views refresh
    state_changed = Signal(str)  # a TrayState value
    logged = Signal(object)  # a LogEntry
    notify = Signal(str, str, str)  # level ("info", "warning", "error"), title, message

    def __init__(
        self,
        client: DaemonClient,
        preferences: Preferences,
        tokens: TokenStore,
        colours: LinkColours | None = None,
        history: RateHistory | None = None,
    ) -> None:
        super().__init__(client)
        self.client = client
        self.preferences = preferences
        self.tokens = tokens
        self.colours = colours or LinkColours()
        self.history = history or RateHistory()
        self.status: dict[str, Any] = {}
        self.log: deque[LogEntry] = deque(maxlen=LOG_SIZE)
        self.problem = ""  # the last thing that went wrong, in words to act on
        self.state = TrayState.ERROR
        self._up_request: int | None = None
        self._up_failed = False
        self._had_daemon = False
        self._daemon_live = False
        self._seen_events: set[tuple[float, str, str]] = set()
        self._server_lost = False  # "Lost the server" was announced; "connected" ends it
        client.connected.connect(self._on_connected)
        client.disconnected.connect(self._on_disconnected)
        client.status.connect(self._on_status)
        client.sample.connect(self._on_sample)
        client.event.connect(self._on_event)
        client.error.connect(self._on_error)
        client.reply.connect(self._on_reply)

    # -- reading ----------------------------------------------------------------

    @property
    def links(self) -> list[dict[str, Any]]:
        return list(self.status.get("links") or [])

    @property
    def tunnel_up(self) -> bool:
        """True when a Disconnect makes sense (connected, degraded or trying)."""
        return self.state in (TrayState.CONNECTED, TrayState.DEGRADED, TrayState.CONNECTING) and (
            self._up_request is not None or self.status.get("state") != "disconnected"
        )

    def total_rates(self) -> tuple[float, float]:
        tunnel = self.status.get("tunnel") or {}
        return float(tunnel.get("rx_bps") or 0.0), float(tunnel.get("tx_bps") or 0.0)

    def headline(self) -> str:
        """One line for the dashboard: state, server, for how long."""
        label = STATE_LABELS[self.state]
        server = self.status.get("server")
        if self.state in (TrayState.CONNECTED, TrayState.DEGRADED) and server:
            since = self.status.get("connected_since")
            text = f"{label} to {server}"
            if since:
                text += f" · for {format_duration(time.time() - float(since))}"
            return text
        if self.state == TrayState.ERROR and self.problem:
            return self.problem
        if self.state == TrayState.CONNECTING and self.server_problem():
            return f"{label} {self.server_problem()}"
        return label

    def server_problem(self) -> str:
        """Why the daemon is still trying, once it has tried: "lost the server (…); retrying"."""
        error = self.status.get("error")
        if self.status.get("state") != "connecting" or not error:
            return ""
        server = self.status.get("server") or "the server"
        return f"{server} unreachable ({error}); retrying"

    def tooltip(self) -> str:
        rx, tx = self.total_rates()
        lines = [f"Braid: {STATE_LABELS[self.state]}"]
        if self.state in (TrayState.CONNECTED, TrayState.DEGRADED):
            lines.append(f"↓ {format_rate(rx)}   ↑ {format_rate(tx)}")
            down = [
                link["name"]
                for link in self.links
                if link.get("state") != "up" or link.get("alive") is False
            ]
            if down:
                lines.append("Not working: " + ", ".join(down))
        elif self.server_problem():
            lines.append(self.server_problem())
        elif self.problem:
            lines.append(self.problem)
        return "\n".join(lines)

    # -- acting -----------------------------------------------------------------

    def toggle(self) -> int:
        """Connect when down, disconnect when up; returns the request id."""
        return self.disconnect_tunnel() if self.tunnel_up else self.connect_tunnel()

    def pairing_uri(self) -> str | None:
        """The saved pairing with its token, or None to let the daemon use its last one."""
        saved = self.preferences.pairing()
        if saved is None:
            return None
        token = self.tokens.load(saved.server)
        if not token:
            return None
        return Pairing(saved.host, saved.port, saved.fingerprint, token).uri()

    def connect_tunnel(self, pairing: str | None = None) -> int:
        self._up_failed = False
        request = self.client.up(pairing or self.pairing_uri())
        self._up_request = request
        self._add_log("up", None, "connecting…")
        self._refresh()
        return request

    def test_pairing(self, pairing: str | None = None) -> int:
        """Try a pairing without switching the tunnel or saving anything."""
        return self.client.test_pairing(pairing or self.pairing_uri())

    def disconnect_tunnel(self) -> int:
        self._up_request = None
        self._up_failed = False
        return self.client.down()

    def note(self, message: str, level: str = "info") -> None:
        """Something the views did that the user should find in the log (e.g. a saved token)."""
        self._add_log("tray", None, message, level)

    # -- the client's signals ----------------------------------------------------

    def _on_connected(self) -> None:
        if self._had_daemon:
            self._add_log("daemon", None, "the daemon answers again")
        self._had_daemon = self._daemon_live = True
        self.problem = ""
        self._refresh()

    def _on_disconnected(self, reason: str) -> None:
        self.problem = reason
        self._up_request = None
        if self.status:
            self.status = {**self.status, "state": "disconnected"}
        self._add_log("daemon", None, reason, "error")
        if self._daemon_live:  # once per loss, not at every retry
            self._notify("error", "The Braid daemon stopped answering", reason)
        self._daemon_live = False
        self._refresh()

    def _on_status(self, status: dict[str, Any]) -> None:
        for event in status.get("events") or []:
            self._remember_event(event, announce=False)
        self._take(status)

    def _on_sample(self, sample: dict[str, Any]) -> None:
        self.history.push(sample)
        self._take(sample)

    def _on_event(self, event: dict[str, Any]) -> None:
        self._remember_event(event, announce=True)
        if event.get("event") in ("connected", "disconnected", "server-unreachable"):
            self.client.request_status()  # the icon should not wait for the next sample

    def _on_error(self, code: str, message: str) -> None:
        if code == DISCONNECTED:
            return  # the disconnected signal has said it already
        self.problem = message
        self._add_log("error", None, message, "error")
        self._refresh()

    def _on_reply(self, request_id: int, ok: bool, result: object) -> None:
        if request_id != self._up_request:
            return
        self._up_request = None
        if ok:
            self.problem = ""
        else:
            message = result.get("message", "") if isinstance(result, dict) else str(result)
            self._up_failed = True
            self.problem = f"Could not connect: {message}"
            self._notify("error", "Braid could not connect", message)
        self._refresh()

    # -- bookkeeping ------------------------------------------------------------

    def _take(self, status: dict[str, Any]) -> None:
        merged = dict(status)
        if "events" not in merged and "problems" in self.status:
            merged["problems"] = self.status["problems"]
        self.status = merged
        self.colours.assign([str(link.get("name")) for link in self.links])
        if status.get("state") in ("connected", "degraded"):
            self._up_failed = False
        self._refresh()

    def _remember_event(self, event: dict[str, Any], announce: bool) -> None:
        kind = str(event.get("event", ""))
        key = (float(event.get("t") or 0.0), kind, str(event.get("message", "")))
        if key in self._seen_events:
            return
        self._seen_events.add(key)
        if len(self._seen_events) > 4 * LOG_SIZE:
            self._seen_events = {(e.t, e.kind, e.message) for e in self.log}
        message = str(event.get("message") or kind)
        level = _EVENT_LEVELS.get(kind, "info")
        self._add_log(kind, event.get("link"), message, level, t=key[0] or None)
        if not announce:
            return
        if kind == "server-unreachable":
            self._server_lost = True
        elif kind == "connected" and self._server_lost:
            self._server_lost = False
            self._notify("info", "Reconnected", message)
        elif kind in ("link-lost", "link-back") and self._server_lost:
            return  # the server is away, not the links: one bubble has said it
        if kind in NOTIFY_TITLES:
            self._notify(level, NOTIFY_TITLES[kind], message)

    def _add_log(
        self, kind: str, link: Any, message: str, level: str = "info", t: float | None = None
    ) -> None:
        entry = LogEntry(t or time.time(), kind, str(link) if link else None, message, level)
        self.log.append(entry)
        self.logged.emit(entry)

    def _notify(self, level: str, title: str, message: str) -> None:
        if self.preferences.value("notifications"):
            self.notify.emit(level, title, message)

    def compute_state(self) -> TrayState:
        if not self.client.is_connected:
            return TrayState.ERROR
        if self._up_request is not None:
            return TrayState.CONNECTING
        state = self.status.get("state")
        if state == "connected":
            return TrayState.CONNECTED
        if state == "degraded":
            return TrayState.DEGRADED
        if state == "connecting":
            return TrayState.CONNECTING
        return TrayState.ERROR if self._up_failed else TrayState.DISCONNECTED

    def _refresh(self) -> None:
        state = self.compute_state()
        if state != self.state:
            self.state = state
            log.info("tray state: %s", state)
            self.state_changed.emit(str(state))
        self.changed.emit()
