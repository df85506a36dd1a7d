"""The tray icon, its menu, the session's state and notifications, against the fake daemon."""

from __future__ import annotations

import pytest
from fake_braidd import FakeBraidd
from PySide6.QtWidgets import QSystemTrayIcon

from braid.gui.icons import IconSet
from braid.gui.preferences import SavedPairing
from braid.gui.session import Session, TrayState
from braid.gui.tray import Tray

FP = "ab" * 32
TOKEN = "t0ken-for-tests-0123456789"


@pytest.fixture
def tray(qtbot, session: Session) -> Tray:
    return Tray(session, IconSet())


def menu_texts(tray: Tray) -> list[str]:
    tray.menu.aboutToShow.emit()  # what opening the menu does
    return [action.text() for action in tray.menu.actions() if action.text()]


def test_toggle_sends_up_then_down_and_the_icon_follows(qtbot, daemon, session, tray) -> None:
    assert session.state == TrayState.DISCONNECTED
    assert tray.shown_state == "disconnected"
    assert "Connect" in menu_texts(tray)

    tray.toggle_action.trigger()
    qtbot.waitUntil(lambda: tray.shown_state == "connected", timeout=5000)
    assert [r["cmd"] for r in daemon.changes()] == ["up"]
    expected = IconSet().status("connected", tray.panel).pixmap(22, 22).toImage()
    assert tray.icon.icon().pixmap(22, 22).toImage() == expected
    assert tray.icon.toolTip().startswith("Braid: Connected")

    assert "Disconnect" in menu_texts(tray)
    tray.toggle_action.trigger()
    qtbot.waitUntil(lambda: tray.shown_state == "disconnected", timeout=5000)
    assert [r["cmd"] for r in daemon.changes()] == ["up", "down"]


def test_connect_hands_the_saved_pairing_with_its_keyring_token(
    qtbot, daemon, session, file_keyring
) -> None:
    session.preferences.set_pairing(SavedPairing("vps.example.net", 7443, FP))
    session.tokens.save("vps.example.net:7443", TOKEN)
    session.toggle()
    qtbot.waitUntil(lambda: session.state == TrayState.CONNECTED, timeout=5000)
    up = daemon.commands("up")[-1]
    assert up["pairing"] == f"braid://vps.example.net:7443?fp={FP}&token={TOKEN}"


def test_menu_has_a_line_per_link_in_its_colour(qtbot, daemon, session, tray) -> None:
    with qtbot.waitSignal(session.client.sample, timeout=3000):
        daemon.push_sample({"eth0": (41.5e6, 1e6), "usb0": (2e6, 0)})
    texts = menu_texts(tray)
    lines = [t for t in texts if t.split()[0] in ("eth0", "wlan0", "usb0")]
    assert len(lines) == 3
    assert "41.5 Mbit/s" in lines[0] and "Always" in lines[0]
    assert texts[-5:] == ["Dashboard", "Diagnose…", "Settings…", "About Braid", "Quit"]
    icons = [action.icon() for action in tray.link_actions]
    assert all(not icon.isNull() for icon in icons)
    # The colour of a link is the same as in the graphs: its palette entry.
    centre = icons[0].pixmap(16, 16).toImage().pixelColor(8, 8)
    assert centre.name() == session.colours.hex("eth0")


def test_degraded_then_error_when_the_daemon_goes(qtbot, daemon: FakeBraidd, session, tray):
    session.toggle()
    qtbot.waitUntil(lambda: session.state == TrayState.CONNECTED, timeout=5000)
    daemon.state = "degraded"
    daemon.links[1]["alive"] = False
    daemon.push_sample()
    qtbot.waitUntil(lambda: tray.shown_state == "degraded", timeout=3000)
    assert "Not working: wlan0" in tray.icon.toolTip()

    with qtbot.waitSignal(session.notify, timeout=3000) as bubble:
        daemon.stop()
    assert bubble.args[1] == "The Braid daemon stopped answering"
    qtbot.waitUntil(lambda: tray.shown_state == "error", timeout=3000)
    assert "sudo systemctl start braidd" in tray.icon.toolTip()
    texts = menu_texts(tray)
    assert any("braidd" in text for text in texts)
    assert not tray.toggle_action.isEnabled()

    daemon.start()  # the daemon restarts: the tray finds it again by itself
    qtbot.waitUntil(lambda: tray.shown_state == "degraded", timeout=5000)


def test_lost_server_shows_as_connecting_with_the_reason_then_connected(
    qtbot, daemon: FakeBraidd, session, tray
) -> None:
    session.toggle()
    qtbot.waitUntil(lambda: session.state == TrayState.CONNECTED, timeout=5000)
    # What braidd reports while the server restarts: still trying, and why.
    daemon.state, daemon.error = "connecting", "connection refused"
    with qtbot.waitSignal(session.notify, timeout=3000) as bubble:
        daemon.push_event("server-unreachable", None, "lost the server: connection refused")
    assert bubble.args[:2] == ["error", "Lost the server"]
    qtbot.waitUntil(lambda: tray.shown_state == "connecting", timeout=3000)
    tip = tray.icon.toolTip()
    assert "Connecting" in tip and "unreachable (connection refused); retrying" in tip, tip
    assert "retrying" in session.headline()
    assert "Disconnect" in menu_texts(tray)  # it is still trying: the toggle stops it
    # Its probes go unanswered on every link too: that is the server, not the links.
    with qtbot.assertNotEmitted(session.notify, wait=300):
        daemon.push_event("link-lost", "wlan0", "wlan0 stopped answering")
    assert session.log[-1].message == "wlan0 stopped answering"

    daemon.state, daemon.error = "connected", None
    with qtbot.waitSignal(session.notify, timeout=3000) as bubble:
        daemon.push_event("connected", None, "connected to vps.example.net:7443")
    assert bubble.args[:2] == ["info", "Reconnected"]
    qtbot.waitUntil(lambda: tray.shown_state == "connected", timeout=3000)
    assert "retrying" not in tray.icon.toolTip()


@pytest.mark.parametrize(
    ("kind", "title"),
    [
        ("failover", "New connections moved to another link"),
        ("no-link", "No link reaches the server"),
        ("link-lost", "A link stopped answering"),
        ("link-back", "A link is back"),
        ("cap-reached", "Data cap reached"),
    ],
)
def test_link_events_become_notifications(qtbot, daemon, session, kind, title) -> None:
    with qtbot.waitSignal(session.notify, timeout=3000) as bubble:
        daemon.push_event(kind, "usb0", f"usb0: {kind}")
    assert bubble.args[1:] == [title, f"usb0: {kind}"]
    assert session.log[-1].message == f"usb0: {kind}"


def test_notifications_can_be_turned_off(qtbot, daemon, session) -> None:
    session.preferences.set_value("notifications", False)
    with qtbot.assertNotEmitted(session.notify, wait=300):
        daemon.push_event("link-lost", "wlan0", "wlan0 stopped answering")
    qtbot.waitUntil(lambda: session.log[-1].message == "wlan0 stopped answering", timeout=3000)


def test_forbidden_shows_the_group_message(qtbot, daemon, session, tray) -> None:
    daemon.forbidden = {"up", "down"}
    session.toggle()
    qtbot.waitUntil(lambda: "braid group" in session.problem, timeout=3000)
    assert "sudo usermod -aG braid $USER" in session.problem
    assert session.state == TrayState.ERROR
    qtbot.waitUntil(lambda: tray.shown_state == "error", timeout=3000)
    assert "braid group" in tray.icon.toolTip()


def test_failed_up_says_why(qtbot, daemon, session) -> None:
    daemon.up_error = "the server's certificate does not match the pinned fingerprint"
    with qtbot.waitSignal(session.notify, timeout=3000) as bubble:
        session.toggle()
    assert bubble.args[2] == daemon.up_error
    assert session.state == TrayState.ERROR
    assert daemon.up_error in session.problem


def test_messages_only_when_the_icon_is_shown(qtbot, session, tray, monkeypatch) -> None:
    shown: list[tuple] = []
    monkeypatch.setattr(QSystemTrayIcon, "supportsMessages", staticmethod(lambda: True))
    monkeypatch.setattr(tray.icon, "showMessage", lambda *args: shown.append(args))
    monkeypatch.setattr(tray.icon, "isVisible", lambda: True)
    tray.show_message("warning", "A link stopped answering", "wlan0 stopped answering")
    assert shown and shown[0][0] == "A link stopped answering"
    assert shown[0][2] == QSystemTrayIcon.MessageIcon.Warning


def test_about_box_shows_the_same_version_as_the_command_line() -> None:
    import subprocess
    import sys

    import braid
    from braid.gui.tray import about_text

    cli = subprocess.run(
        [sys.executable, "-m", "braid.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert cli.stdout.strip() == f"braid {braid.__version__}"
    assert f"Braid {braid.__version__}" in about_text()
