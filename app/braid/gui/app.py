"""``braid tray`` (also ``braid-tray``): the tray icon, the dashboard and the settings dialog.

    braid tray [--control PATH] [--show dashboard|settings|diagnose|menu [--page NAME]]
               [--dump FILE] [--instance NAME]

One tray per user: a second start asks the first to show its dashboard (or what
--show says) and exits. Without a system tray the dashboard opens instead, and closing
it quits. --dump asks the running tray to write its state as JSON (tests, bug reports).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, QSettings, QSocketNotifier, QTimer
from PySide6.QtWidgets import QApplication, QSystemTrayIcon

from braid.client import default_control_path
from braid.gui.client import DaemonClient
from braid.gui.colours import LinkColours
from braid.gui.dashboard import Dashboard
from braid.gui.diagnose import DiagnoseDialog
from braid.gui.icons import IconSet
from braid.gui.instance import SingleInstance, forward, instance_name
from braid.gui.preferences import Preferences, config_dir
from braid.gui.session import Session
from braid.gui.settings import SettingsDialog
from braid.gui.tokens import TokenStore
from braid.gui.tray import Tray

log = logging.getLogger("braid.tray")

TRAY_POLL_MS = 2000  # how often to look for a tray host that was not there at start
SNI_WATCHER = "org.kde.StatusNotifierWatcher"
NO_TRAY_NOTICE = (
    "This desktop shows no tray icons, so Braid stays in this window: closing it quits Braid. "
    "Notifications go to the desktop's notification service. For an icon: on GNOME, the AppIndicator extension; "
    "on sway, waybar's tray; KDE Plasma and Xfce have one."
)


def tray_host() -> str:
    """How the icon is shown: "StatusNotifierItem" (D-Bus), "XEmbed" (X11) or "none".

    Qt prefers StatusNotifierItem whenever a watcher owns its name on the session bus.
    """
    if not QSystemTrayIcon.isSystemTrayAvailable():
        return "none"
    from PySide6.QtDBus import QDBusConnection

    bus = QDBusConnection.sessionBus()
    if bus.isConnected() and bus.interface().isServiceRegistered(SNI_WATCHER).value():
        return "StatusNotifierItem"
    return "XEmbed"


class TrayApp(QObject):
    """Builds and wires everything; the one place that knows all the parts."""

    def __init__(self, control_path: str, app: QApplication) -> None:
        super().__init__()
        self.app = app
        self.icons = IconSet()
        self.preferences = Preferences()
        self.tokens = TokenStore()
        colour_store = QSettings(str(config_dir() / "colours.conf"), QSettings.Format.IniFormat)
        self.client = DaemonClient(control_path, self)
        self.session = Session(
            self.client, self.preferences, self.tokens, LinkColours(colour_store)
        )
        self.tray = Tray(self.session, self.icons, self)
        self.tray.dashboard_requested.connect(self.toggle_dashboard)
        self.tray.settings_requested.connect(self.show_settings)
        self.tray.diagnose_requested.connect(self.show_diagnose)
        self.tray.quit_requested.connect(self.quit)
        self.dashboard: Dashboard | None = None
        self.settings: SettingsDialog | None = None
        self.diagnose: DiagnoseDialog | None = None
        self.has_tray = False
        self.host = "none"
        self._tray_poll = QTimer(self)
        self._tray_poll.setInterval(TRAY_POLL_MS)
        self._tray_poll.timeout.connect(self._look_for_tray)

    def start(self) -> None:
        self.client.start()
        self.host = tray_host()
        self.has_tray = self.host != "none"
        log.info("system tray available: %s (%s)", str(self.has_tray).lower(), self.host)
        if self.has_tray:
            self.tray.show()
        else:
            log.info("no system tray: showing the dashboard instead (closing it quits)")
            self.show_dashboard()
            self._tray_poll.start()

    def _look_for_tray(self) -> None:
        """A panel that starts after us (a login race) still gets its icon."""
        if QSystemTrayIcon.isSystemTrayAvailable():
            self._tray_poll.stop()
            self.host = tray_host()
            self.has_tray = True
            self.tray.show()
            if self.dashboard is not None:
                self.dashboard.set_notice("")
            log.info("system tray available: true (%s; it appeared)", self.host)

    # -- windows ------------------------------------------------------------------------

    def ensure_dashboard(self) -> Dashboard:
        if self.dashboard is None:
            self.dashboard = Dashboard(self.session, self.icons)
            self.dashboard.settings_requested.connect(self.show_settings)
            self.dashboard.diagnose_requested.connect(self.show_diagnose)
            self.dashboard.closed.connect(self._dashboard_closed)
            if not self.has_tray:
                self.dashboard.set_notice(NO_TRAY_NOTICE)
        return self.dashboard

    def show_dashboard(self) -> None:
        self.ensure_dashboard().present()

    def toggle_dashboard(self) -> None:
        self.ensure_dashboard().toggle_visible()

    def _dashboard_closed(self) -> None:
        if not self.has_tray:
            self.quit()  # with no tray there would be no way back to it

    def show_settings(self, page: str = "") -> None:
        if self.settings is not None and self.settings.isVisible():
            self.settings.raise_()
            self.settings.activateWindow()
            if page:
                self.settings.select_page(page.capitalize())
            return
        self.settings = SettingsDialog(self.session, self.icons, self.tokens)
        if page:
            self.settings.select_page(page.capitalize())
        self.settings.applied.connect(self.tray.refresh)
        self.settings.finished.connect(self._settings_closed)
        self.settings.show()
        self.settings.raise_()
        self.settings.activateWindow()

    def show_diagnose(self) -> None:
        """One Diagnose window: opening it again raises it (and checks again if it is done)."""
        if self.diagnose is None:
            self.diagnose = DiagnoseDialog(self.session)
        if not self.diagnose.running:
            self.diagnose.run()
        self.diagnose.show()
        self.diagnose.raise_()
        self.diagnose.activateWindow()

    def _settings_closed(self) -> None:
        if self.settings is not None:
            self.settings.deleteLater()
            self.settings = None

    # -- requests from a second start --------------------------------------------------

    def show_menu(self) -> None:
        """Open the tray menu by the icon, as a click would (for screenshots and tests)."""
        self.tray.rebuild_menu()
        area = self.tray.icon.geometry()
        self.tray.menu.popup(
            area.bottomLeft() if area.isValid() else self.app.primaryScreen().geometry().center()
        )

    def handle(self, message: str) -> None:
        verb, _, argument = message.partition(" ")
        what, _, page = argument.partition(" ")
        if verb == "show" and self.tray.menu.isVisible():
            self.tray.menu.hide()
        if verb == "show" and what == "settings":
            self.show_settings(page)
        elif verb == "show" and what == "diagnose":
            self.show_diagnose()
        elif verb == "show" and what == "menu":
            self.show_menu()
        elif verb == "show":
            self.show_dashboard()
        elif verb == "dump" and argument:
            self.dump(Path(argument))
        else:
            log.warning("ignoring an unknown request from another start: %r", message)

    def state(self) -> dict[str, Any]:
        """What the tray shows, as data: for tests, benchmarks and bug reports."""
        dashboard = self.dashboard
        return {
            "pid": os.getpid(),
            "tray_available": QSystemTrayIcon.isSystemTrayAvailable(),
            "tray_visible": self.tray.icon.isVisible(),
            "tray_host": self.host,
            "platform": self.app.platformName(),
            "icon_state": self.tray.shown_state,
            "tooltip": self.tray.icon.toolTip(),
            "daemon_connected": self.client.is_connected,
            "state": str(self.session.state),
            "problem": self.session.problem,
            "links": [link.get("name") for link in self.session.links],
            "history": self.session.history.summary(),
            "samples": self.session.history.count,
            "dashboard_visible": bool(dashboard and dashboard.isVisible()),
            "notice": dashboard.notice.text() if dashboard and dashboard.notice.isVisible() else "",
            "curves": dashboard.graphs.drawn_peaks() if dashboard else {},
            "settings_visible": bool(self.settings and self.settings.isVisible()),
            "diagnose": self._diagnose_state(),
            "menu": [action.text() for action in self.tray.menu.actions() if action.text()],
        }

    def _diagnose_state(self) -> dict[str, Any]:
        window = self.diagnose
        if window is None:
            return {"visible": False}
        return {
            "visible": window.isVisible(),
            "running": window.running,
            "level": (window.report or {}).get("level"),
            "links": [window.links.item(i).text() for i in range(window.links.count())],
        }

    def dump(self, path: Path) -> None:
        if not self.tray.menu.isVisible():
            self.tray.rebuild_menu()  # what it would show if opened now
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.state(), indent=2))
        os.replace(tmp, path)

    def quit(self) -> None:
        self.client.stop()
        self.tray.icon.hide()
        self.app.quit()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="braid tray", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--control",
        default=default_control_path(),
        help="the daemon's control socket (default: $BRAID_CONTROL or /run/braid/control.sock)",
    )
    parser.add_argument(
        "--show",
        choices=("dashboard", "settings", "diagnose", "menu"),
        help="open this window at start (or in the tray already running)",
    )
    parser.add_argument(
        "--page",
        choices=[page.lower() for page in SettingsDialog.PAGES],
        default="",
        help="with --show settings: the page to open",
    )
    parser.add_argument("--dump", metavar="FILE", help="ask the running tray to write its state")
    parser.add_argument(
        "--instance",
        default="braid-tray",
        metavar="NAME",
        help="run apart from the usual tray (e.g. braid demo's, on the emulated world)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s braid-tray: %(message)s",
        datefmt="%H:%M:%S",
    )
    app = QApplication.instance() or QApplication(["braid-tray"])  # also the X11 WM_CLASS
    app.setApplicationName("Braid")
    app.setDesktopFileName("braid-tray")
    app.setQuitOnLastWindowClosed(False)  # closing the dashboard leaves the tray running

    if args.dump:
        message = f"dump {Path(args.dump).resolve()}"
    else:
        message = f"show {args.show or 'dashboard'} {args.page}".strip()
    name = instance_name(args.instance)
    if forward(message, name):
        log.info("Braid's tray is already running: asked it to %s", message)
        return 0
    if args.dump:
        print("braid tray: no tray is running", file=sys.stderr)
        return 1

    instance = SingleInstance(name)
    instance.listen()
    tray = TrayApp(args.control, app)
    app.setWindowIcon(tray.icons.app())
    instance.message.connect(tray.handle)
    tray.start()
    if args.show:
        tray.handle(f"show {args.show} {args.page}".strip())

    wakeup = _quit_on_signals(tray)
    code = app.exec()
    instance.close()
    del wakeup
    return code


def _quit_on_signals(tray: TrayApp) -> tuple[socket.socket, socket.socket, QSocketNotifier]:
    """Ctrl-C and SIGTERM end the tray cleanly.

    Python runs signal handlers only between bytecodes, never while Qt's loop waits; the
    wakeup fd makes the loop wake (instead of polling with a timer, which costs CPU).
    """
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    signal.set_wakeup_fd(writer.fileno())
    notifier = QSocketNotifier(reader.fileno(), QSocketNotifier.Type.Read, tray)
    notifier.activated.connect(lambda *_: reader.recv(64))
    signal.signal(signal.SIGINT, lambda *_: tray.quit())
    signal.signal(signal.SIGTERM, lambda *_: tray.quit())
    return reader, writer, notifier


if __name__ == "__main__":
    sys.exit(main())
