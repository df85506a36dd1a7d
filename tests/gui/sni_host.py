"""A StatusNotifierItem host for the tray's tests, on a private session bus of its own.

``SessionBus`` starts a real ``dbus-daemon --session`` on a socket in a temporary
directory. ``SniHost`` then does on that bus what a panel does (KDE Plasma's system tray,
GNOME's AppIndicator extension, waybar): it owns org.kde.StatusNotifierWatcher and
org.freedesktop.Notifications, records every RegisterStatusNotifierItem and Notify call,
and reads a registered item the way a host draws it: its properties (Title, ToolTip,
IconPixmap or IconName, Status, Menu), the menu's layout over com.canonical.dbusmenu
(AboutToShow, then GetLayout), and clicks (Activate, a menu item's "clicked" event).

It speaks D-Bus with jeepney (pure Python): one connection serves the two names from a
thread, another asks the item questions from the test's thread, so a Notify that arrives
while the test reads the menu is never lost.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jeepney import (
    DBusAddress,
    MessageType,
    new_error,
    new_method_call,
    new_method_return,
    new_signal,
)
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection

WATCHER = "org.kde.StatusNotifierWatcher"
WATCHER_PATH = "/StatusNotifierWatcher"
NOTIFICATIONS = "org.freedesktop.Notifications"
NOTIFICATIONS_PATH = "/org/freedesktop/Notifications"
ITEM = "org.kde.StatusNotifierItem"
ITEM_PATH = "/StatusNotifierItem"
MENU = "com.canonical.dbusmenu"
PROPERTIES = "org.freedesktop.DBus.Properties"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"

_INTROSPECTION = """<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">
<node>
  <interface name="org.kde.StatusNotifierWatcher">
    <method name="RegisterStatusNotifierItem"><arg name="service" type="s" direction="in"/></method>
    <method name="RegisterStatusNotifierHost"><arg name="service" type="s" direction="in"/></method>
    <property name="RegisteredStatusNotifierItems" type="as" access="read"/>
    <property name="IsStatusNotifierHostRegistered" type="b" access="read"/>
    <property name="ProtocolVersion" type="i" access="read"/>
    <signal name="StatusNotifierItemRegistered"><arg type="s"/></signal>
    <signal name="StatusNotifierItemUnregistered"><arg type="s"/></signal>
    <signal name="StatusNotifierHostRegistered"/>
  </interface>
  <interface name="org.freedesktop.Notifications">
    <method name="Notify">
      <arg type="s" direction="in"/><arg type="u" direction="in"/><arg type="s" direction="in"/>
      <arg type="s" direction="in"/><arg type="s" direction="in"/><arg type="as" direction="in"/>
      <arg type="a{sv}" direction="in"/><arg type="i" direction="in"/>
      <arg type="u" direction="out"/>
    </method>
    <method name="CloseNotification"><arg type="u" direction="in"/></method>
    <method name="GetCapabilities"><arg type="as" direction="out"/></method>
    <method name="GetServerInformation">
      <arg type="s" direction="out"/><arg type="s" direction="out"/>
      <arg type="s" direction="out"/><arg type="s" direction="out"/>
    </method>
    <signal name="NotificationClosed"><arg type="u"/><arg type="u"/></signal>
    <signal name="ActionInvoked"><arg type="u"/><arg type="s"/></signal>
  </interface>
</node>
"""

_SIGNATURES = {
    (WATCHER, "RegisterStatusNotifierItem"): "s",
    (WATCHER, "RegisterStatusNotifierHost"): "s",
    (NOTIFICATIONS, "Notify"): "susssasa{sv}i",
    (NOTIFICATIONS, "CloseNotification"): "u",
    (PROPERTIES, "Get"): "ss",
    (PROPERTIES, "GetAll"): "s",
}


class SessionBus:
    """A private ``dbus-daemon --session``: its address goes into the tray's environment."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="braid-bus-"))
        self.address = f"unix:path={self.dir / 'bus'}"
        self.process: subprocess.Popen | None = None

    def start(self) -> SessionBus:
        self.process = subprocess.Popen(
            ["dbus-daemon", "--session", "--nofork", "--nopidfile", f"--address={self.address}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not (self.dir / "bus").exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("dbus-daemon did not start its session bus")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SessionBus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Notification:
    app: str
    icon: str
    summary: str
    body: str
    actions: list[str]
    hints: dict[str, Any]
    timeout_ms: int
    id: int


@dataclass
class MenuEntry:
    id: int
    label: str
    enabled: bool = True
    visible: bool = True
    separator: bool = False
    children: list[MenuEntry] = field(default_factory=list)


class SniHost:
    """The watcher and the notification server, serving from a thread until ``stop()``."""

    def __init__(self, bus_address: str, watcher: bool = True) -> None:
        self.bus_address = bus_address
        # Without the watcher it is a desktop with notifications and no tray (GNOME's own).
        self.names = (WATCHER, NOTIFICATIONS) if watcher else (NOTIFICATIONS,)
        self.items: list[str] = []  # the services that registered, in order
        self.notifications: list[Notification] = []
        self.calls: list[str] = []  # every method called on us: "Interface.Member"
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = open_dbus_connection(bus=bus_address)
        self._client = open_dbus_connection(bus=bus_address)
        self._thread: threading.Thread | None = None

    def start(self) -> SniHost:
        for name in self.names:
            reply = self._server.send_and_get_reply(message_bus.RequestName(name, 4), timeout=5)
            if reply.body[0] != 1:  # DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER
                raise RuntimeError(f"could not own {name} on the test bus: {reply.body}")
        self._thread = threading.Thread(target=self._serve, name="sni-host", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
        for conn in (self._server, self._client):
            with contextlib.suppress(OSError):
                conn.close()

    def __enter__(self) -> SniHost:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- serving --------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                message = self._server.receive(timeout=0.2)
            except TimeoutError:
                continue
            except (OSError, ValueError):
                return
            if message.header.message_type != MessageType.method_call:
                continue
            fields = message.header.fields
            interface = fields.get(2, "")  # HeaderFields.interface
            member = fields.get(3, "")  # HeaderFields.member
            with self._lock:
                self.calls.append(f"{interface}.{member}")
            signature = fields.get(8, "")  # HeaderFields.signature
            expected = _SIGNATURES.get((interface, member))
            if expected is not None and signature != expected:
                # As a real server answers a call with the wrong argument types.
                reply = new_error(
                    message,
                    "org.freedesktop.DBus.Error.InvalidArgs",
                    "s",
                    (f"{member} takes ({expected}), got ({signature})",),
                )
            else:
                reply = self._answer(message, interface, member, fields.get(6, ""))
            if reply is not None:
                self._server.send(reply)

    def _answer(self, message, interface: str, member: str, sender: str):
        body = message.body
        if interface == INTROSPECTABLE and member == "Introspect":
            return new_method_return(message, "s", (_INTROSPECTION,))
        if interface == PROPERTIES and member in ("Get", "GetAll"):
            properties = {
                "RegisteredStatusNotifierItems": ("as", list(self.items)),
                "IsStatusNotifierHostRegistered": ("b", True),
                "ProtocolVersion": ("i", 0),
            }
            if member == "GetAll":
                return new_method_return(message, "a{sv}", (properties,))
            return new_method_return(message, "v", (properties[body[1]],))
        if interface == WATCHER and member == "RegisterStatusNotifierItem":
            # A bus name (the item at /StatusNotifierItem), or an object path of the caller's.
            service = sender if body[0].startswith("/") else body[0]
            with self._lock:
                self.items.append(service)
            self._server.send(new_method_return(message))
            emitter = DBusAddress(WATCHER_PATH, interface=WATCHER)
            return new_signal(emitter, "StatusNotifierItemRegistered", "s", (service,))
        if interface == WATCHER and member == "RegisterStatusNotifierHost":
            return new_method_return(message)
        if interface == NOTIFICATIONS and member == "Notify":
            app, replaces, icon, summary, text, actions, hints, timeout = body
            with self._lock:
                number = replaces or len(self.notifications) + 1
                self.notifications.append(
                    Notification(
                        app, icon, summary, text, list(actions), dict(hints), timeout, number
                    )
                )
            return new_method_return(message, "u", (number,))
        if interface == NOTIFICATIONS and member == "GetCapabilities":
            return new_method_return(message, "as", (["body", "actions"],))
        if interface == NOTIFICATIONS and member == "GetServerInformation":
            return new_method_return(message, "ssss", ("braid-test-host", "braid", "1", "1.2"))
        if interface == NOTIFICATIONS and member == "CloseNotification":
            return new_method_return(message)
        return new_error(message, "org.freedesktop.DBus.Error.UnknownMethod", "s", (member,))

    # -- reading an item, as a host draws it ------------------------------------------

    def wait_for_item(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.items:
                    return self.items[-1]
            time.sleep(0.05)
        return None

    def wait_for_notification(self, predicate, timeout: float) -> Notification | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = [n for n in self.notifications if predicate(n)]
            if found:
                return found[-1]
            time.sleep(0.05)
        return None

    def _call(self, service: str, path: str, interface: str, member: str, signature=None, body=()):
        address = DBusAddress(path, bus_name=service, interface=interface)
        reply = self._client.send_and_get_reply(
            new_method_call(address, member, signature, body), timeout=5
        )
        if reply.header.message_type == MessageType.error:
            raise RuntimeError(f"{interface}.{member} on {service}: {reply.body}")
        return reply.body

    def item_properties(self, service: str) -> dict[str, Any]:
        """Every property of the item, variants unwrapped."""
        (properties,) = self._call(service, ITEM_PATH, PROPERTIES, "GetAll", "s", (ITEM,))
        return {name: value for name, (_signature, value) in properties.items()}

    def activate(self, service: str) -> None:
        """A left click on the icon."""
        self._call(service, ITEM_PATH, ITEM, "Activate", "ii", (10, 10))

    def menu(self, service: str, path: str) -> list[MenuEntry]:
        """The menu as a host shows it: AboutToShow first (the app may rebuild it), then GetLayout."""
        self._call(service, path, MENU, "AboutToShow", "i", (0,))
        time.sleep(0.2)  # an app that rebuilds its menu on AboutToShow has done so by now
        _revision, layout = self._call(service, path, MENU, "GetLayout", "iias", (0, -1, []))
        return _entries(layout)[0].children

    def click(self, service: str, path: str, entry: MenuEntry) -> None:
        self._call(
            service, path, MENU, "Event", "isvu", (entry.id, "clicked", ("s", ""), int(time.time()))
        )


def _entries(node) -> list[MenuEntry]:
    number, properties, children = node
    values = {name: value for name, (_signature, value) in properties.items()}
    entry = MenuEntry(
        id=number,
        label=_without_mnemonic(str(values.get("label", ""))),
        enabled=bool(values.get("enabled", True)),
        visible=bool(values.get("visible", True)),
        separator=values.get("type") == "separator",
    )
    for _signature, child in children:
        entry.children.extend(_entries(child))
    return [entry]


def _without_mnemonic(label: str) -> str:
    """dbusmenu marks the access key with "_" and writes a real underscore as "__"."""
    return label.replace("__", "\0").replace("_", "").replace("\0", "_")


def environment(bus: SessionBus) -> dict[str, str]:
    """What a desktop session gives its applications: the bus, and nothing of the host's."""
    env = {**os.environ, "DBUS_SESSION_BUS_ADDRESS": bus.address}
    return env


def icon_images(pixmaps) -> list:
    """IconPixmap (a(iiay), ARGB32 in network byte order) as QImages, smallest first."""
    import numpy as np
    from PySide6.QtGui import QImage

    images = []
    for width, height, data in sorted(pixmaps, key=lambda p: p[0]):
        pixels = np.frombuffer(bytes(data), dtype=">u4").astype("<u4")
        image = QImage(pixels.tobytes(), width, height, QImage.Format.Format_ARGB32)
        images.append(image.copy())  # own the pixels: the buffer goes away
    return images


def picture(path: Path, service: str, properties: dict, menu: list[MenuEntry], notes) -> None:
    """What a panel would show of the item: its icon, tooltip, open menu and the bubbles."""
    from PySide6.QtCore import QRect, Qt
    from PySide6.QtGui import QColor, QFont, QImage, QPainter, QPen

    width, height = 760, 560
    canvas = QImage(width, height, QImage.Format.Format_ARGB32)
    canvas.fill(QColor("#3b4252"))
    painter = QPainter(canvas)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    font = QFont("DejaVu Sans", 10)
    painter.setFont(font)
    bold = QFont(font)
    bold.setBold(True)

    # The panel, with the item's icon at the size panels use (22 px) at its right end.
    painter.fillRect(0, 0, width, 32, QColor("#1e1e1e"))
    painter.setPen(QColor("#d8dee9"))
    painter.drawText(
        QRect(10, 0, 600, 32),
        Qt.AlignmentFlag.AlignVCenter,
        f"test SNI host · item {service} · Status {properties.get('Status')}",
    )
    images = icon_images(properties.get("IconPixmap") or [])
    panel_icon = next((i for i in images if i.width() >= 22), images[-1] if images else None)
    if panel_icon is not None:
        painter.drawImage(QRect(width - 34, 5, 22, 22), panel_icon)
    # Every size the item sent, side by side.
    x = 470
    painter.drawText(QRect(x, 40, 280, 20), 0, "IconPixmap sizes:")
    for image in images:
        if x + image.width() > width - 8:
            break
        painter.drawImage(x, 62, image)
        x += image.width() + 6

    # The tooltip, as a host shows ToolTip (title, text).
    _icon, _images, title, text = properties.get("ToolTip") or ("", [], "", "")
    tip = "\n".join(part for part in (title, text) if part)
    painter.setPen(QColor("#eceff4"))
    painter.drawText(QRect(12, 40, 440, 20), 0, f"Title: {properties.get('Title')}")
    painter.fillRect(12, 64, 400, 56, QColor("#fdf6d8"))
    painter.setPen(QColor("#222222"))
    painter.drawText(QRect(20, 68, 390, 50), 0, tip)

    # The menu, from GetLayout.
    top, left, row = 140, 12, 24
    shown = [entry for entry in menu if entry.visible]
    painter.fillRect(left, top, 400, row * len(shown) + 8, QColor("#fafafa"))
    painter.setPen(QPen(QColor("#999999")))
    painter.drawRect(left, top, 400, row * len(shown) + 8)
    y = top + 4
    for entry in shown:
        if entry.separator:
            painter.setPen(QColor("#cccccc"))
            painter.drawLine(left + 8, y + row // 2, left + 392, y + row // 2)
        else:
            painter.setPen(QColor("#222222") if entry.enabled else QColor("#8a8a8a"))
            painter.drawText(
                QRect(left + 12, y, 380, row), Qt.AlignmentFlag.AlignVCenter, entry.label
            )
        y += row

    # The notifications that came through Notify.
    nx, ny = 430, 140
    painter.setPen(QColor("#eceff4"))
    painter.drawText(QRect(nx, ny, 320, 20), 0, "org.freedesktop.Notifications.Notify:")
    ny += 24
    for note in notes[-4:]:
        painter.fillRect(nx, ny, 320, 70, QColor("#2e3440"))
        painter.setPen(QColor("#88c0d0"))
        painter.setFont(bold)
        painter.drawText(QRect(nx + 8, ny + 4, 304, 20), 0, f"{note.app}: {note.summary}")
        painter.setFont(font)
        painter.setPen(QColor("#eceff4"))
        painter.drawText(
            QRect(nx + 8, ny + 24, 304, 44),
            int(Qt.TextFlag.TextWordWrap),
            f"{note.body}\nicon {note.icon} · urgency {note.hints.get('urgency', ('', '?'))[1]}",
        )
        ny += 78
    painter.end()
    canvas.save(str(path))
