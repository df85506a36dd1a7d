"""The tray icon: the state at a glance, a toggle, the links, and the way to everything else."""

from __future__ import annotations

from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QAction, QGuiApplication
from PySide6.QtWidgets import QMenu, QSystemTrayIcon

import braid
from braid.gui import notifications
from braid.gui.icons import IconSet
from braid.gui.model import PRIORITIES, STATE_LABELS
from braid.gui.session import STATE_LABELS as TRAY_LABELS
from braid.gui.session import Session, TrayState
from braid.units import format_rate

_MESSAGE_ICONS = {
    "info": QSystemTrayIcon.MessageIcon.Information,
    "warning": QSystemTrayIcon.MessageIcon.Warning,
    "error": QSystemTrayIcon.MessageIcon.Critical,
}


def panel_colours(preference: str) -> str:
    """Which icon variant to draw: the user's choice, else the desktop's colour scheme."""
    if preference in ("light", "dark"):
        return preference
    hints = QGuiApplication.styleHints()
    scheme = hints.colorScheme() if hasattr(hints, "colorScheme") else None
    return "light" if scheme is not None and scheme.name == "Light" else "dark"


def link_line(link: dict) -> str:
    """One menu line: name, state, rate, priority."""
    state = STATE_LABELS.get(str(link.get("state")), str(link.get("state")))
    if link.get("state") == "up" and link.get("alive") is False:
        state = "not answering"
    priority = dict(PRIORITIES).get(str(link.get("effective_priority") or link.get("priority")), "")
    rate = f"↓ {format_rate(link.get('rx_bps'))}"
    return f"{link.get('name')}   {state.lower()} · {rate} · {priority}"


class Tray(QObject):
    """Owns the QSystemTrayIcon; asks the app (by signal) to show windows or quit."""

    dashboard_requested = Signal()  # left click: show or hide
    settings_requested = Signal()
    diagnose_requested = Signal()
    quit_requested = Signal()

    def __init__(self, session: Session, icons: IconSet, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.icons = icons
        self.icon = QSystemTrayIcon(self)
        self.menu = QMenu()
        self.menu.aboutToShow.connect(self.rebuild_menu)
        self.icon.setContextMenu(self.menu)
        self.icon.activated.connect(self._activated)
        self.shown_state: str = ""
        self.shown_panel: str = ""
        session.changed.connect(self.refresh)
        session.notify.connect(self.show_message)
        self.rebuild_menu()  # some hosts read the menu before it is first opened
        self.refresh()

    @property
    def panel(self) -> str:
        return panel_colours(str(self.session.preferences.value("panel")))

    def show(self) -> None:
        self.icon.show()

    def refresh(self) -> None:
        """Swap the icon only on a state change (icon hosts redraw on every set)."""
        state, panel = str(self.session.state), self.panel
        if (state, panel) != (self.shown_state, self.shown_panel):
            self.icon.setIcon(self.icons.status(state, panel))
            self.shown_state, self.shown_panel = state, panel
        tooltip = self.session.tooltip()
        if tooltip != self.icon.toolTip():
            self.icon.setToolTip(tooltip)

    def rebuild_menu(self) -> None:
        """Build the menu afresh each time it opens, so it is never stale."""
        session = self.session
        self.menu.clear()
        title = self.menu.addAction(f"Braid: {TRAY_LABELS[session.state]}")
        title.setEnabled(False)
        self.toggle_action = self.menu.addAction("Disconnect" if session.tunnel_up else "Connect")
        self.toggle_action.setEnabled(session.client.is_connected)
        self.toggle_action.triggered.connect(session.toggle)
        if session.state == TrayState.ERROR and session.problem:
            problem = self.menu.addAction(_shorten(session.problem))
            problem.setEnabled(False)
        self.menu.addSeparator()
        self.link_actions: list[QAction] = []
        for link in session.links:
            name = str(link.get("name"))
            action = self.menu.addAction(
                self.icons.kind(str(link.get("kind")), session.colours.colour(name)),
                link_line(link),
            )
            action.triggered.connect(self.dashboard_requested)
            self.link_actions.append(action)
        if not session.links:
            empty = self.menu.addAction("No links found")
            empty.setEnabled(False)
        self.menu.addSeparator()
        self.menu.addAction("Dashboard").triggered.connect(self.dashboard_requested)
        self.menu.addAction("Diagnose…").triggered.connect(self.diagnose_requested)
        self.menu.addAction("Settings…").triggered.connect(self.settings_requested)
        self.menu.addAction("About Braid").triggered.connect(show_about)
        self.menu.addSeparator()
        self.menu.addAction("Quit").triggered.connect(self.quit_requested)

    def _activated(self, reason: QSystemTrayIcon.ActivationReason) -> None:
        if reason == QSystemTrayIcon.ActivationReason.Trigger:
            self.dashboard_requested.emit()

    def show_message(self, level: str, title: str, message: str) -> None:
        """A bubble by the icon; with no tray host, straight to the notification server."""
        if self.icon.isVisible() and QSystemTrayIcon.supportsMessages():
            icon = _MESSAGE_ICONS.get(level, QSystemTrayIcon.MessageIcon.Information)
            self.icon.showMessage(title, message, icon, 8000)
        else:
            notifications.notify_soon("Braid", level, title, message)


def _shorten(text: str, limit: int = 140) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def about_text() -> str:
    """The About box's text: the same version as ``braid --version``."""
    return (
        f"<b>Braid {braid.__version__}</b><br>"
        "Bonds your Ethernet, Wi-Fi and tethered links into one faster connection "
        "that survives the loss of any of them, through Multipath TCP to your own server."
    )


def show_about() -> None:
    from PySide6.QtWidgets import QMessageBox

    QMessageBox.about(None, "About Braid", about_text())
