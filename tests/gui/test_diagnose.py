"""The tray's Diagnose window: braidd's doctor report, asked for without freezing the tray."""

from __future__ import annotations

from PySide6.QtGui import QGuiApplication

from braid.gui.diagnose import DiagnoseDialog


def test_diagnose_shows_each_link_in_plain_words(qtbot, daemon, session) -> None:
    daemon.doctor_delay = 1.5  # braidd's checks take seconds
    daemon.udp_blocked = {"wlan0"}
    session.connect_tunnel()
    qtbot.waitUntil(lambda: session.status.get("state") == "connected", timeout=3000)
    dialog = DiagnoseDialog(session)
    qtbot.addWidget(dialog)
    dialog.show()
    dialog.run()
    assert dialog.running and dialog.progress.isVisible()
    assert not dialog.again.isEnabled() and "Checking each link" in dialog.status.text()
    qtbot.waitUntil(lambda: bool(daemon.commands("doctor")), timeout=1000)

    # The window stays live meanwhile: samples keep arriving and are drawn.
    before = session.history.count
    daemon.push_sample({"eth0": (20e6, 1e6)})
    qtbot.waitUntil(lambda: session.history.count > before, timeout=1000)
    assert dialog.running, "the sample came while braidd was still checking"

    qtbot.waitUntil(lambda: dialog.report is not None, timeout=5000)
    assert not dialog.progress.isVisible() and dialog.again.isEnabled()
    lines = [dialog.links.item(i).text() for i in range(dialog.links.count())]
    assert len(lines) == 3, lines
    assert lines[0].endswith("eth0 (ethernet): works"), lines
    assert "wlan0 (wifi): Braid cannot use it as it is" in lines[1], lines
    assert "UDP to the server's port 7443 is blocked" in lines[1], lines
    assert "Problems found" in dialog.status.text()
    text = dialog.details.toPlainText()
    assert text.startswith("Braid doctor — server 198.18.20.2:7443")
    assert "=> problems above" in text

    dialog.copy.click()
    assert QGuiApplication.clipboard().text() == text


def test_measure_speed_follows_braidds_progress_and_shows_each_link(qtbot, daemon, session) -> None:
    daemon.speed_step = 0.15
    session.connect_tunnel()
    qtbot.waitUntil(lambda: session.status.get("state") == "connected", timeout=3000)
    dialog = DiagnoseDialog(session)
    qtbot.addWidget(dialog)
    dialog.show()
    dialog.measure()
    assert dialog.running and not dialog.speed.isEnabled() and not dialog.again.isEnabled()
    # The bar follows the steps braidd reports (3 links and the bonded test, each both ways).
    qtbot.waitUntil(lambda: dialog.progress.maximum() == 8, timeout=2000)
    qtbot.waitUntil(lambda: dialog.progress.value() >= 2, timeout=3000)
    assert "] wlan0: download" in dialog.status.text() or "] wlan0: upload" in dialog.status.text()
    qtbot.waitUntil(lambda: dialog.speed_result is not None, timeout=5000)
    assert not dialog.progress.isVisible() and dialog.speed.isEnabled()
    lines = [dialog.links.item(i).text() for i in range(dialog.links.count())]
    assert lines[0].startswith("eth0: down 18.8 Mbit/s, up 18.6 Mbit/s; round trip 11 ms idle")
    assert len(lines) == 3, lines
    assert "all links bonded: down" in dialog.status.text()
    text = dialog.details.toPlainText()
    assert text.startswith("Braid speed test") and "took 24 s and moved 46.0 MB" in text
    assert daemon.commands("speed-test")


def test_a_speed_test_goes_on_when_the_window_is_closed(qtbot, daemon, session) -> None:
    daemon.speed_step = 0.1
    dialog = DiagnoseDialog(session)
    qtbot.addWidget(dialog)
    dialog.show()
    dialog.measure()
    qtbot.waitUntil(lambda: dialog.progress.maximum() == 8, timeout=2000)
    dialog.reject()  # closed while braidd measures
    assert dialog.running, "the measurement is still braidd's to finish"
    qtbot.waitUntil(lambda: dialog.speed_result is not None, timeout=5000)
    assert not dialog.running and dialog.links.count() == 3
    assert len(daemon.commands("speed-test")) == 1


def test_measure_speed_says_who_may(qtbot, daemon, session) -> None:
    daemon.forbidden = {"speed-test"}
    dialog = DiagnoseDialog(session)
    qtbot.addWidget(dialog)
    dialog.measure()
    qtbot.waitUntil(lambda: not dialog.running, timeout=3000)
    assert "braidd could not measure the links" in dialog.status.text()
    assert "braid" in dialog.status.text() and dialog.speed_result is None


def test_diagnose_says_when_braidd_does_not_answer(qtbot, daemon, session) -> None:
    daemon.doctor_delay = 5.0
    dialog = DiagnoseDialog(session, wait=0.5)
    qtbot.addWidget(dialog)
    dialog.run()
    qtbot.waitUntil(lambda: not dialog.running, timeout=3000)
    assert "braidd did not answer within" in dialog.status.text()
    assert dialog.report is None and dialog.again.isEnabled()


def test_diagnose_says_why_it_could_not_run(qtbot, daemon, session) -> None:
    daemon.stop()  # the daemon is gone
    qtbot.waitUntil(lambda: not session.client.is_connected, timeout=3000)
    dialog = DiagnoseDialog(session)
    qtbot.addWidget(dialog)
    dialog.run()
    qtbot.waitUntil(lambda: not dialog.running, timeout=3000)
    assert "braidd could not run its checks" in dialog.status.text()
    assert "not running" in dialog.status.text() or "stopped" in dialog.status.text()


def test_the_dashboard_and_the_menu_open_it(qtbot, daemon) -> None:
    from PySide6.QtWidgets import QApplication

    from braid.gui.app import TrayApp

    app = TrayApp(str(daemon.path), QApplication.instance())
    try:
        app.start()
        qtbot.waitUntil(lambda: app.client.is_connected, timeout=3000)
        assert "Diagnose…" in [a.text() for a in app.tray.menu.actions()]
        app.dashboard.diagnose_button.click()
        assert app.diagnose is not None and app.diagnose.isVisible() and app.diagnose.running
        qtbot.waitUntil(lambda: app.state()["diagnose"]["level"] == "warning", timeout=5000)
        # Not connected: the UDP probes have not run, which is a warning, not a failure.
        assert all("works" in line for line in app.state()["diagnose"]["links"])
    finally:
        app.client.stop()
        if app.diagnose is not None:
            app.diagnose.close()
        if app.dashboard is not None:
            app.dashboard.close()
