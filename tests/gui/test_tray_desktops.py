"""The real tray on the desktops users have: StatusNotifierItem hosts, Wayland, and no tray at all.

KDE Plasma, GNOME with the AppIndicator extension and waybar show tray icons through
StatusNotifierItem over the session bus, and bubbles through org.freedesktop.Notifications.
Here a real ``dbus-daemon --session`` carries them, with tests/gui/sni_host.py owning the
watcher and the notification server as such a panel does; the tray runs as its own process
under Xvfb or a headless Weston, against tests/gui/fake_braidd.py. Pictures go to
test-output/gui/: what the host read of the item (sni-*.png), and the screen itself.
"""

from __future__ import annotations

import pytest
from desktop import OUTPUT, Desktop, require_tools, wait_for
from sni_host import SessionBus, SniHost, picture

pytestmark = pytest.mark.timeout(180)
RATES = {"eth0": (31e6, 2e6), "wlan0": (18e6, 1e6), "usb0": (6e6, 0.5e6)}


@pytest.mark.parametrize("kind", ["x11", "wayland"])
def test_a_statusnotifier_host_shows_the_tray(qapp, daemon, kind: str) -> None:
    require_tools(kind)
    name = f"sni-{kind}"
    daemon.keep_sampling(RATES)
    with SessionBus() as bus, SniHost(bus.address) as host:
        desktop = Desktop(kind, daemon.path, bus.address, name).start()
        try:
            item = host.wait_for_item(20)
            assert item, f"the tray never registered with the watcher: {host.calls}"
            state = wait_for(
                lambda: (s := desktop.state())["tray_visible"] and s, 20, "the tray icon"
            )
            assert state["tray_host"] == "StatusNotifierItem", state
            assert state["platform"] == {"x11": "xcb", "wayland": "wayland"}[kind]
            assert not state["dashboard_visible"], "with a tray the dashboard waits for a click"

            properties = host.item_properties(item)
            assert properties["Status"] == "Active"
            assert properties["Title"] == "Braid"
            pixmaps = properties["IconPixmap"]
            assert any(w == h >= 22 for w, h, _ in pixmaps), [(w, h) for w, h, _ in pixmaps]
            assert all(any(data[0::4]) for _, _, data in pixmaps), "an icon with no pixel"
            tooltip = properties["ToolTip"][2]
            assert tooltip.startswith("Braid: Disconnected"), properties["ToolTip"]

            menu = host.menu(item, properties["Menu"])
            labels = [entry.label for entry in menu if not entry.separator]
            assert "Connect" in labels and "Settings…" in labels and "Quit" in labels, labels
            for link in ("eth0", "wlan0", "usb0"):
                assert any(label.startswith(link) for label in labels), labels

            # A link is lost: the bubble goes through the notification server.
            daemon.push_event("link-lost", "usb0", "usb0 stopped answering (no probe for 2 s)")
            note = host.wait_for_notification(lambda n: "usb0" in n.body, 10)
            assert note is not None, host.calls
            assert (note.app, note.summary) == ("Braid", "A link stopped answering")
            assert note.icon == "dialog-warning"
            # Qt marks the item NeedsAttention while the bubble shows (8 s), as hosts expect.
            assert host.item_properties(item)["Status"] == "NeedsAttention"

            # The host's clicks reach the tray: the toggle connects, the icon opens windows.
            toggle = next(entry for entry in menu if entry.label == "Connect")
            host.click(item, properties["Menu"], toggle)
            wait_for(lambda: daemon.commands("up"), 10, "the menu's Connect to reach braidd")
            wait_for(
                lambda: (
                    (p := host.item_properties(item))["Status"] == "Active"
                    and p["ToolTip"][2].startswith("Braid: Connected")
                ),
                15,
                "the attention to end and the tooltip to say connected",
            )
            menu = host.menu(item, properties["Menu"])
            assert "Disconnect" in [entry.label for entry in menu], menu
            picture(
                OUTPUT / f"{name}.png", item, host.item_properties(item), menu, host.notifications
            )

            host.activate(item)
            wait_for(lambda: desktop.state()["dashboard_visible"], 10, "Activate to open it")
            menu = host.menu(item, properties["Menu"])  # opened again: built afresh
            settings = next(entry for entry in menu if entry.label == "Settings…")
            host.click(item, properties["Menu"], settings)
            wait_for(lambda: desktop.state()["settings_visible"], 10, "the settings dialog")
            wait_for(lambda: desktop.logged("tray state: connected"), 5, "the state in the log")
            desktop.screenshot(f"{name}-screen")
        finally:
            code = desktop.stop()
    assert code == 0, desktop.log.read_text()[-3000:]


def test_wayland_without_a_tray_still_works(daemon) -> None:
    """A bare Wayland compositor: no StatusNotifierWatcher, only a notification server."""
    require_tools("wayland")
    daemon.keep_sampling(RATES)
    with SessionBus() as bus, SniHost(bus.address, watcher=False) as host:
        desktop = Desktop("wayland", daemon.path, bus.address, "wayland").start()
        try:
            wait_for(lambda: desktop.logged("system tray available: false"), 20, "the tray")
            state = wait_for(
                lambda: (s := desktop.state())["dashboard_visible"] and s, 20, "the dashboard"
            )
            assert state["platform"] == "wayland" and state["tray_host"] == "none", state
            assert "no tray icons" in state["notice"] and "closing it quits" in state["notice"]
            assert state["links"] == ["eth0", "wlan0", "usb0"]

            daemon.push_event("link-lost", "wlan0", "wlan0 stopped answering (no probe for 2 s)")
            note = host.wait_for_notification(lambda n: "wlan0" in n.body, 10)
            assert note is not None, f"no Notify without a tray: {host.calls}"
            assert note.summary == "A link stopped answering" and note.hints["urgency"] == ("y", 1)

            desktop.screenshot("wayland-dashboard")
            desktop.ask("--show", "settings", "--page", "links")
            wait_for(lambda: desktop.state()["settings_visible"], 10, "the settings dialog")
            desktop.screenshot("wayland-settings")

            daemon.udp_blocked = {"usb0"}
            desktop.ask("--show", "diagnose")
            state = wait_for(
                lambda: (s := desktop.state())["diagnose"].get("level") and s, 15, "Diagnose"
            )
            assert state["diagnose"]["visible"] and not state["diagnose"]["running"]
            assert any("eth0 (ethernet): works" in line for line in state["diagnose"]["links"])
            desktop.screenshot("wayland-diagnose")
        finally:
            code = desktop.stop()
    assert code == 0, desktop.log.read_text()[-3000:]
