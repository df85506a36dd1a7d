"""Desktop notifications without a tray icon: org.freedesktop.Notifications over D-Bus.

With a tray the icon shows the bubbles (under StatusNotifierItem Qt calls Notify itself).
A desktop with no tray host (GNOME without the AppIndicator extension, a bare Wayland
compositor) usually still runs a notification server: the tray sends there instead, from
a thread, so a slow or missing server never holds up a window.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

SERVICE = "org.freedesktop.Notifications"
PATH = "/org/freedesktop/Notifications"
ICONS = {"info": "dialog-information", "warning": "dialog-warning", "error": "dialog-error"}
URGENCY = {"info": 1, "warning": 1, "error": 2}  # the spec's byte: 0 low, 1 normal, 2 critical
WAIT = 5.0  # seconds for the server to answer


def notify(app: str, level: str, title: str, message: str, timeout_ms: int = 8000) -> int | None:
    """Send one notification and wait for its id; None when no server took it (blocks)."""
    try:
        from jeepney import DBusAddress, MessageType, new_method_call
        from jeepney.io.blocking import open_dbus_connection
    except ImportError:  # not on Linux, or installed without the gui extra
        return None
    address = DBusAddress(PATH, bus_name=SERVICE, interface=SERVICE)
    hints = {"urgency": ("y", URGENCY.get(level, 1)), "desktop-entry": ("s", "braid-tray")}
    body = (app, 0, ICONS.get(level, ""), title, message, [], hints, timeout_ms)
    try:
        with open_dbus_connection(bus="SESSION") as conn:
            reply = conn.send_and_get_reply(
                new_method_call(address, "Notify", "susssasa{sv}i", body), timeout=WAIT
            )
    except Exception as exc:  # no session bus, no server, a server that hangs
        log.info("no desktop notification (%s): %s: %s", exc, title, message)
        return None
    if reply.header.message_type == MessageType.error:
        log.info("the notification server refused %r: %s", title, reply.body)
        return None
    return int(reply.body[0])


def notify_soon(app: str, level: str, title: str, message: str) -> threading.Thread:
    """``notify`` from a thread of its own: the caller never waits."""
    thread = threading.Thread(
        target=notify, args=(app, level, title, message), name="notification", daemon=True
    )
    thread.start()
    return thread
