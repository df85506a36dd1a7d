"""The dashboard and its graphs: samples move the curves, the status line and log follow."""

from __future__ import annotations

import numpy as np
import pytest

from braid.gui.dashboard import Dashboard
from braid.gui.graphs import RateHistory
from braid.gui.icons import IconSet
from braid.gui.session import Session, TrayState


@pytest.fixture
def dashboard(qtbot, session: Session) -> Dashboard:
    window = Dashboard(session, IconSet())
    qtbot.addWidget(window)
    window.graphs.timer.setInterval(50)  # the one redraw timer, faster for the test
    window.show()
    return window


def test_history_is_a_fixed_ring_of_five_minutes() -> None:
    history = RateHistory(size=300)
    for second in range(320):
        history.push({"links": [{"name": "eth0", "rx_bps": second, "tx_bps": 1}], "tunnel": {}})
    rx = history.series("eth0", "rx")
    assert rx.shape == (300,)
    assert rx[0] == 20 and rx[-1] == 319  # oldest first, the first 20 scrolled out
    assert history.latest("eth0") == 319
    assert history.series("", "rx")[-1] == 319  # the total falls back to the links' sum
    # A link that vanished leaves a gap, then the window forgets it.
    history.push({"links": [], "tunnel": {}})
    assert np.isnan(history.series("eth0")[-1])
    for _ in range(300):
        history.push({"links": [], "tunnel": {}})
    assert history.names() == []


def test_a_sample_stream_moves_the_curves(qtbot, daemon, session, dashboard) -> None:
    before = session.history.series("eth0", "rx").copy()
    for step in range(1, 4):
        with qtbot.waitSignal(session.client.sample, timeout=3000):
            daemon.push_sample({"eth0": (step * 10e6, 1e6), "wlan0": (5e6, 0.5e6)})
    after = session.history.series("eth0", "rx")
    assert not np.array_equal(before, after, equal_nan=True)
    assert list(after[-3:]) == [10e6, 20e6, 30e6]
    qtbot.waitUntil(lambda: dashboard.graphs.drawn_peaks().get("eth0", {}).get("rx") == 30e6)
    peaks = dashboard.graphs.drawn_peaks()
    assert peaks["wlan0"]["rx"] == 5e6
    assert peaks["usb0"]["rx"] == 0.0  # present, idle
    assert peaks["total"]["rx"] == 35e6
    # The legend and the table show the same rates in Mbit/s.
    qtbot.waitUntil(lambda: "↓ 30.0  ↑ 1.0 Mbit/s" in dashboard.legend._labels["eth0"].text())
    model = dashboard.model
    assert model.index(0, model.column_of("rx")).data() == "30.0 Mbit/s"


def test_hidden_graphs_do_not_redraw(qtbot, daemon, session, dashboard) -> None:
    dashboard.hide()
    with qtbot.waitSignal(session.client.sample, timeout=3000):
        daemon.push_sample({"eth0": (1e6, 0)})
    assert not dashboard.graphs.redraw()
    with qtbot.waitSignal(dashboard.graphs.redrawn, timeout=3000):
        dashboard.show()  # catches up at once


def test_status_line_and_events(qtbot, daemon, session, dashboard) -> None:
    assert dashboard.toggle_button.text() == "Connect"
    dashboard.toggle_button.click()
    qtbot.waitUntil(lambda: session.state == TrayState.CONNECTED, timeout=3000)
    qtbot.waitUntil(lambda: "Connected to 198.18.20.2:7443" in dashboard.headline.text())
    assert dashboard.toggle_button.text() == "Disconnect"
    assert "SOCKS5 proxy 127.0.0.1:1080" in dashboard.details.text()
    with qtbot.waitSignal(session.logged, timeout=3000):
        daemon.push_event("link-lost", "wlan0", "wlan0 stopped answering")
    assert "wlan0 stopped answering" in dashboard.events.item(0).text()
    with qtbot.waitSignal(session.client.disconnected, timeout=3000):
        daemon.stop()
    qtbot.waitUntil(lambda: "sudo systemctl start braidd" in dashboard.headline.text())
    assert not dashboard.toggle_button.isEnabled()
