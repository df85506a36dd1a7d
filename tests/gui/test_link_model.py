"""braid.gui.model: the link table, checked by Qt's own model tester, edited and reordered."""

from __future__ import annotations

import pytest
from fake_braidd import make_link
from PySide6.QtCore import QModelIndex, Qt

from braid.gui.colours import PALETTE, LinkColours
from braid.gui.icons import IconSet
from braid.gui.model import DASHBOARD_COLUMNS, SETTINGS_COLUMNS, LinkTableModel


def links() -> list[dict]:
    rows = [
        make_link("eth0", "ethernet", 0),
        make_link("wlan0", "wifi", 1),
        make_link("usb0", "cellular", 2, "backup"),
    ]
    rows[0].update(rx_bps=48_100_000, used_bytes=126_000_000)
    rows[1].update(alive=False)
    rows[2].update(
        cap={"limit_bytes": 10_000_000_000, "period": "month", "reset_day": 3, "then": "never"}
    )
    return rows


@pytest.fixture
def model(qapp) -> LinkTableModel:
    table = LinkTableModel(LinkColours(), IconSet(), SETTINGS_COLUMNS, editable=True)
    table.set_links(links())
    return table


def test_dashboard_model_passes_the_model_tester(qtmodeltester) -> None:
    model = LinkTableModel(LinkColours(), IconSet(), DASHBOARD_COLUMNS)
    model.set_links(links())
    qtmodeltester.check(model, force_py=True)
    qtmodeltester.check(model)
    model.set_links(links()[:2])  # a link went away: a reset the tester follows too
    qtmodeltester.check(model)


def test_settings_model_passes_the_model_tester(qtmodeltester, model) -> None:
    qtmodeltester.check(model, force_py=True)
    qtmodeltester.check(model)


def test_dashboard_shows_units_and_health(qapp) -> None:
    model = LinkTableModel(LinkColours(), IconSet(), DASHBOARD_COLUMNS)
    model.set_links(links())

    def cell(row: int, key: str) -> str:
        return model.index(row, model.column_of(key)).data()

    assert cell(0, "rx") == "48.1 Mbit/s"
    assert cell(0, "rtt") == "10 ms"
    assert cell(0, "used") == "126.0 MB"
    assert cell(1, "state") == "Not answering"
    assert cell(2, "priority") == "Backup"
    assert cell(2, "used") == "0 B / 10.0 GB"
    assert not model.flags(model.index(0, model.column_of("priority"))) & Qt.ItemFlag.ItemIsEditable


def test_a_link_behind_a_captive_portal_asks_for_sign_in(qapp) -> None:
    rows = links()
    rows[0].update(connectivity="portal", alive=None, carrying=False)
    model = LinkTableModel(LinkColours(), IconSet(), DASHBOARD_COLUMNS)
    model.set_links(rows)
    state = model.index(0, model.column_of("state"))
    assert state.data() == "Sign-in required"
    assert "sign in" in state.data(Qt.ItemDataRole.ToolTipRole)
    rows[0].update(connectivity="full", alive=True, carrying=True)
    model.set_links(rows)
    assert model.index(0, model.column_of("state")).data() == "Up"


def test_each_link_keeps_its_colour(qapp) -> None:
    colours = LinkColours()
    colours.assign(["eth0", "wlan0", "usb0"])
    assert [colours.hex(n) for n in ("eth0", "wlan0", "usb0")] == list(PALETTE[:3])
    colours.assign(["usb0", "eth1"])  # a new link takes a free colour, the others keep theirs
    assert colours.hex("usb0") == PALETTE[2]
    assert colours.hex("eth1") == PALETTE[3]


def test_edits_priority_metered_and_cap(model: LinkTableModel) -> None:
    priority = model.index(0, model.column_of("priority"))
    assert model.flags(priority) & Qt.ItemFlag.ItemIsEditable
    assert model.setData(priority, "backup")
    assert model.links()[0]["priority"] == "backup"
    assert not model.setData(priority, "sometimes")

    metered = model.index(0, model.column_of("metered"))
    assert model.setData(metered, Qt.CheckState.Checked.value, Qt.ItemDataRole.CheckStateRole)
    assert model.links()[0]["metered"] is True

    # No cap yet: its period and reset day are greyed out until one is set.
    reset_day = model.index(0, model.column_of("reset_day"))
    assert not model.flags(reset_day) & Qt.ItemFlag.ItemIsEnabled
    assert model.setData(model.index(0, model.column_of("cap")), "5 GB")
    assert model.links()[0]["cap"]["limit_bytes"] == 5_000_000_000
    assert model.flags(reset_day) & Qt.ItemFlag.ItemIsEnabled
    assert model.setData(reset_day, 15)
    assert model.links()[0]["cap"]["reset_day"] == 15

    refused: list[str] = []
    model.invalid.connect(refused.append)
    assert not model.setData(reset_day, 31)
    assert not model.setData(model.index(0, model.column_of("cap")), "lots")
    assert len(refused) == 2 and "28" in refused[0]
    assert model.setData(model.index(0, model.column_of("cap")), "")  # no cap again
    assert model.links()[0]["cap"] is None


def test_drag_and_drop_reorders(model: LinkTableModel) -> None:
    data = model.mimeData([model.index(2, 0), model.index(2, 3)])
    assert model.canDropMimeData(data, Qt.DropAction.MoveAction, 0, 0, QModelIndex())
    assert model.dropMimeData(data, Qt.DropAction.MoveAction, 0, 0, QModelIndex())
    assert model.names() == ["usb0", "eth0", "wlan0"]
    # Dropping onto a row puts the dragged link before it.
    data = model.mimeData([model.index(0, 0)])
    assert model.dropMimeData(data, Qt.DropAction.MoveAction, -1, -1, model.index(2, 1))
    assert model.names() == ["eth0", "usb0", "wlan0"]
    # Dropping past the end moves it last; the buttons move one step.
    data = model.mimeData([model.index(0, 0)])
    assert model.dropMimeData(data, Qt.DropAction.MoveAction, -1, -1, QModelIndex())
    assert model.names() == ["usb0", "wlan0", "eth0"]
    assert model.move(2, -1) and model.names() == ["usb0", "eth0", "wlan0"]
    assert not model.move(0, -1)
