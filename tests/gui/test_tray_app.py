"""braid.gui.app and its parts: one instance per user, no-tray fallback, state dump, icons."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PySide6.QtWidgets import QApplication

from braid.gui import icons
from braid.gui.app import TrayApp, parse_args
from braid.gui.instance import SingleInstance, forward, instance_name

RESOURCES = Path(__file__).resolve().parents[2] / "resources"


@pytest.fixture
def tray_app(qtbot, daemon):
    app = TrayApp(str(daemon.path), QApplication.instance())
    app.client._retry_delays = (0.05,)
    yield app
    app.client.stop()
    app.tray.icon.hide()
    if app.dashboard is not None:
        app.dashboard.close()
        app.dashboard.deleteLater()


def test_one_instance_per_user(qtbot) -> None:
    first = SingleInstance()
    assert first.listen()
    with qtbot.waitSignal(first.message, timeout=3000) as got:
        assert forward("show settings")
    assert got.args == ["show settings"]
    first.close()
    assert not forward("show dashboard", timeout_ms=300)  # nobody left to ask


def test_another_instance_name_runs_apart(qtbot) -> None:
    usual = SingleInstance()
    assert usual.listen()
    demo = SingleInstance(instance_name("braid-demo-tray"))
    assert demo.listen()
    with qtbot.waitSignal(demo.message, timeout=3000) as got:
        assert forward("show dashboard", instance_name("braid-demo-tray"))
    assert got.args == ["show dashboard"]
    usual.close()
    demo.close()


def test_a_stale_instance_socket_is_taken_over(qtbot) -> None:
    first = SingleInstance()
    assert first.listen()
    second = SingleInstance()  # as after a crash that left the socket behind
    first.server.close()
    assert second.listen()
    second.close()


def test_without_a_tray_the_dashboard_opens(qtbot, tray_app) -> None:
    tray_app.start()  # offscreen has no system tray
    assert not tray_app.has_tray
    assert tray_app.dashboard is not None and tray_app.dashboard.isVisible()
    qtbot.waitUntil(lambda: tray_app.client.is_connected, timeout=3000)


def test_requests_from_a_second_start(qtbot, daemon, tray_app, tmp_path: Path) -> None:
    tray_app.start()
    qtbot.waitUntil(lambda: len(tray_app.session.links) == 3, timeout=3000)
    with qtbot.waitSignal(tray_app.session.client.sample, timeout=3000):
        daemon.push_sample({"eth0": (12e6, 1e6), "wlan0": (3e6, 0), "usb0": (1e6, 0)})
    tray_app.handle("show settings")
    assert tray_app.settings is not None and tray_app.settings.isVisible()
    dump = tmp_path / "state.json"
    tray_app.handle(f"dump {dump}")
    state = json.loads(dump.read_text())
    assert state["daemon_connected"] is True
    assert state["links"] == ["eth0", "wlan0", "usb0"]
    assert state["history"]["eth0"]["rx_max_bps"] == 12e6
    assert state["settings_visible"] is True
    assert any(line.startswith("eth0") for line in state["menu"])
    tray_app.settings.reject()


def test_arguments() -> None:
    args = parse_args(["--control", "/somewhere/control.sock", "--show", "settings"])
    assert (args.control, args.show) == ("/somewhere/control.sock", "settings")


def test_every_state_has_its_own_icon_for_both_panels(qapp) -> None:
    images = {}
    for state in icons.STATES:
        for panel in ("light", "dark"):
            image = icons.render(icons.status_painter(state, panel), 22)
            assert not image.isNull()
            images[(state, panel)] = image
    assert len({bytes(img.constBits()) for img in images.values()}) == len(images)


def test_the_committed_icon_theme_is_complete(qapp) -> None:
    """Packaging installs resources/icons: every state and size must be there."""
    theme = RESOURCES / "icons" / "hicolor"
    for state in icons.STATES:
        for panel in ("light", "dark"):
            name = f"braid-{state}-{panel}-panel"
            assert (theme / "scalable" / "status" / f"{name}.svg").is_file()
            for size in icons.STATUS_SIZES:
                assert (theme / f"{size}x{size}" / "status" / f"{name}.png").is_file()
    for size in icons.APP_SIZES:
        assert (theme / f"{size}x{size}" / "apps" / "braid.png").is_file()
    desktop = (RESOURCES / "braid-tray.desktop").read_text()
    assert "Exec=braid-tray" in desktop and "Icon=braid" in desktop


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="None is immortal from Python 3.12")
def test_none_survives_many_qt_calls(qapp) -> None:
    """PySide6 6.12.0 drops a reference to None per void call on 3.11: the guard holds."""
    from PySide6.QtWidgets import QLabel

    label = QLabel()
    for _ in range(20000):
        label.setText("x")
    assert sys.getrefcount(None) > 1 << 39
