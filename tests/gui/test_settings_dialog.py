"""The settings dialog: what OK sends, what Cancel does not, pairing, keyring, autostart."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import keyring
import pytest
from PySide6.QtCore import QModelIndex, Qt
from PySide6.QtWidgets import QFileDialog, QRadioButton

from braid.gui import autostart
from braid.gui.icons import IconSet
from braid.gui.session import Session
from braid.gui.settings import SettingsDialog
from braid.gui.tokens import TokenStore

FP = "3f5c" * 16
TOKEN = "Zx9-pairing-token_0123456789"
URI = f"braid://vps.example.net:7443?fp={FP}&token={TOKEN}"


@pytest.fixture
def dialog(qtbot, session: Session) -> SettingsDialog:
    window = SettingsDialog(session, IconSet(), session.tokens)
    qtbot.addWidget(window)
    window.show()
    qtbot.waitUntil(lambda: "Traffic" in window.daemon_forms, timeout=3000)
    return window


def test_reorder_and_priority_send_exactly_those_changes(qtbot, daemon, dialog) -> None:
    model = dialog.links_page.model
    data = model.mimeData([model.index(2, 0)])  # drag usb0 to the top
    assert model.dropMimeData(data, Qt.DropAction.MoveAction, 0, 0, QModelIndex())
    assert model.setData(model.index(1, model.column_of("priority")), "backup")  # eth0
    assert model.setData(model.index(0, model.column_of("cap")), "20 GB")  # usb0
    assert daemon.changes() == []  # nothing leaves before OK

    dialog.buttons.button(dialog.buttons.StandardButton.Ok).click()
    qtbot.waitUntil(lambda: len(daemon.changes()) == 3, timeout=3000)
    sent = [{k: v for k, v in r.items() if k != "id"} for r in daemon.changes()]
    assert sent[0] == {"cmd": "set-order", "links": ["usb0", "eth0", "wlan0"]}
    assert {"cmd": "set-link", "link": "eth0", "priority": "backup"} in sent
    cap = next(r for r in sent if r.get("link") == "usb0")["cap"]
    assert cap["limit_bytes"] == 20_000_000_000 and cap["period"] == "month"
    assert [x["name"] for x in daemon.status()["links"]] == ["usb0", "eth0", "wlan0"]


def test_cancel_sends_nothing(qtbot, daemon, dialog) -> None:
    model = dialog.links_page.model
    assert model.move(2, -1)
    assert model.setData(model.index(0, model.column_of("priority")), "never")
    dialog.daemon_forms["Advanced"].set_value("probe_interval_ms", 500)
    dialog.general_form.set_value("start_at_login", True)
    dialog.buttons.button(dialog.buttons.StandardButton.Cancel).click()
    assert not dialog.isVisible()
    with qtbot.assertNotEmitted(dialog.session.client.reply, wait=300):
        pass
    assert daemon.changes() == []
    assert not autostart.is_enabled()


def test_unchanged_ok_sends_nothing(qtbot, daemon, dialog) -> None:
    dialog.accept()
    with qtbot.assertNotEmitted(dialog.session.client.reply, wait=300):
        pass
    assert daemon.changes() == []


def test_links_page_priority_is_a_drop_down_on_every_row(dialog) -> None:
    page = dialog.links_page
    column = page.model.column_of("priority")
    for row in range(page.model.rowCount()):
        assert page.table.isPersistentEditorOpen(page.model.index(row, column))
    page.table.selectRow(2)
    page.up_button.click()
    assert page.model.names() == ["eth0", "usb0", "wlan0"]
    assert page.table.isPersistentEditorOpen(page.model.index(1, column))


def test_choosing_a_priority_in_its_drop_down_sends_it_on_ok(qtbot, daemon, dialog) -> None:
    page = dialog.links_page
    index = page.model.index(1, page.model.column_of("priority"))  # wlan0
    combo = page.table.indexWidget(index)
    assert [combo.itemText(i) for i in range(combo.count())] == ["Always", "Backup", "Never"]
    combo.setCurrentIndex(combo.findData("never"))
    combo.activated.emit(combo.currentIndex())  # what a user's pick emits
    assert page.model.links()[1]["priority"] == "never"
    dialog.accept()
    qtbot.waitUntil(lambda: len(daemon.changes()) == 1, timeout=3000)
    assert daemon.changes()[0]["link"] == "wlan0" and daemon.changes()[0]["priority"] == "never"


def test_bad_pairing_is_refused_with_the_reason(qtbot, daemon, dialog, file_keyring) -> None:
    page = dialog.server_page
    page.uri.setPlainText("braid://vps.example.net:7443?fp=1234&token=" + TOKEN)
    assert "64 hexadecimal digits" in page.verdict.text()
    assert not page.test_button.isEnabled()
    dialog.select_page("Links")
    dialog.accept()
    assert dialog.isVisible()  # OK does not pretend to save it
    assert dialog.stack.currentIndex() == dialog.PAGES.index("Server")
    assert keyring.get_password("braid", "vps.example.net:7443") is None
    page.uri.setPlainText("https://vps.example.net/")
    assert "braid://" in page.verdict.text()


def test_pairing_token_goes_to_the_keyring(qtbot, daemon, dialog, file_keyring) -> None:
    page = dialog.server_page
    page.uri.setPlainText(URI)
    assert "valid pairing" in page.verdict.text()
    assert page.server_label.text() == "vps.example.net:7443"
    assert page.fingerprint_label.text().startswith("3f5c 3f5c")
    assert "keyring" in page.token_label.text()
    dialog.accept()
    assert not dialog.isVisible()
    assert keyring.get_password("braid", "vps.example.net:7443") == TOKEN
    assert json.loads(file_keyring.path.read_text())["braid"]["vps.example.net:7443"] == TOKEN
    saved = dialog.session.preferences.pairing()
    assert (saved.host, saved.port, saved.fingerprint) == ("vps.example.net", 7443, FP)
    assert TOKEN not in dialog.session.preferences.path.read_text()  # never beside the rest
    assert daemon.changes() == []  # saving a pairing does not connect by itself


def test_without_a_keyring_the_token_goes_to_a_private_file(
    qtbot, dialog, no_keyring, private_home: Path
) -> None:
    page = dialog.server_page
    page.uri.setPlainText(URI)
    assert "no keyring" in page.token_label.text()
    dialog.accept()
    path = private_home / ".config" / "braid" / "tokens.json"
    assert json.loads(path.read_text()) == {"vps.example.net:7443": TOKEN}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "readable only by you" in dialog.session.tokens.where
    assert "readable only by you" in dialog.session.log[-1].message  # said, not only done
    assert dialog.session.log[-1].level == "warning"
    assert TokenStore().load("vps.example.net:7443") == TOKEN


def test_open_a_pairing_file(qtbot, dialog, tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "pairing.txt"
    path.write_text(f"braid-server init done. Pair with:\n\n{URI}\n")
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(path), ""))
    dialog.server_page.open_button.click()
    assert dialog.server_page.uri.toPlainText() == URI
    assert dialog.server_page.pairing is not None


def test_test_connection_reports_success_and_the_exact_error(qtbot, daemon, dialog) -> None:
    page = dialog.server_page
    page.uri.setPlainText(URI)
    page.test_button.click()
    qtbot.waitUntil(
        lambda: "Reached vps.example.net:7443 in 21 ms over eth0" in page.test_result.text(),
        timeout=3000,
    )
    assert daemon.commands("test-pairing")[-1]["pairing"] == URI
    # A test switches nothing: the live tunnel and the saved pairing stay as they were.
    assert not daemon.commands("up")

    daemon.up_error = "wrong token: the server refused it (was the server initialised again?)"
    page.test_button.click()
    qtbot.waitUntil(lambda: daemon.up_error in page.test_result.text(), timeout=3000)


def test_traffic_page_comes_from_the_declarations_and_the_schema(qtbot, daemon, dialog) -> None:
    form = dialog.daemon_forms["Traffic"]
    radios = {b.text(): b for b in form.widgets["mode"].findChildren(QRadioButton)}
    assert radios["Proxy only (SOCKS5)"].isChecked()
    assert not radios["System-wide (coming soon)"].isEnabled()
    # Settings this daemon does not offer yet are shown, disabled, and never sent.
    assert not form.specs["bypass"].supported
    assert not form.widgets["bypass"].isEnabled()
    assert "bypass" not in form.values()
    # The rest of the schema lands on Advanced, typed from it.
    advanced = dialog.daemon_forms["Advanced"]
    assert advanced.widgets["probe_interval_ms"].maximum() == 2000
    advanced.set_value("probe_interval_ms", 500)
    dialog.accept()
    qtbot.waitUntil(lambda: daemon.settings["probe_interval_ms"] == 500, timeout=3000)
    sent = daemon.commands("set-settings")
    assert len(sent) == 1 and sent[0]["settings"] == {"probe_interval_ms": 500}


def test_start_at_login_writes_and_removes_the_autostart_entry(
    qtbot, session, private_home: Path
) -> None:
    entry = private_home / ".config" / "autostart" / "braid-tray.desktop"
    for wanted in (True, False):
        dialog = SettingsDialog(session, IconSet(), session.tokens)
        qtbot.addWidget(dialog)
        dialog.general_form.set_value("start_at_login", wanted)
        dialog.general_form.set_value("notifications", not wanted)
        dialog.accept()
        assert entry.exists() is wanted
        assert session.preferences.value("notifications") is (not wanted)
    dialog = SettingsDialog(session, IconSet(), session.tokens)
    qtbot.addWidget(dialog)
    dialog.general_form.set_value("start_at_login", True)
    dialog.accept()
    text = entry.read_text()
    assert "Exec=" in text and "braid" in text and "Icon=braid" in text


def test_an_interface_braidd_skipped_is_added_on_ok_and_removed_again(
    qtbot, daemon, dialog, session
) -> None:
    page = dialog.links_page
    qtbot.waitUntil(lambda: page.interface_box.count() == 2, timeout=3000)
    assert page.interface_box.itemText(0) == "veth0 — virtual device: veth pair"
    page.interface_box.setCurrentIndex(page.interface_box.findData("enx0c5b"))
    assert page.kind_box.currentData() == "ethernet"  # discovery's guess, to start from
    page.kind_box.setCurrentIndex(page.kind_box.findData("cellular"))
    page.add_button.click()
    assert page.model.names() == ["eth0", "wlan0", "usb0", "enx0c5b"]
    assert page.model.links()[3]["priority"] == "backup"  # a cellular link starts as backup
    assert page.interface_box.count() == 1  # offered once
    assert model_set(page, 3, "priority", "always")
    page.table.selectRow(0)
    assert not page.remove_button.isEnabled()  # found by braidd: set it Never instead
    assert daemon.changes() == []  # nothing leaves before OK

    dialog.accept()
    qtbot.waitUntil(lambda: len(daemon.changes()) == 2, timeout=3000)
    sent = [{k: v for k, v in r.items() if k != "id"} for r in daemon.changes()]
    assert sent == [
        {"cmd": "add-link", "link": "enx0c5b", "kind": "cellular"},
        {"cmd": "set-link", "link": "enx0c5b", "priority": "always"},
    ]
    qtbot.waitUntil(lambda: "enx0c5b" in [x["name"] for x in session.links], timeout=3000)

    again = SettingsDialog(session, IconSet(), session.tokens)
    qtbot.addWidget(again)
    page = again.links_page
    page.table.selectRow(3)
    assert page.remove_button.isEnabled()
    page.remove_button.click()
    assert page.model.names() == ["eth0", "wlan0", "usb0"]
    again.accept()
    qtbot.waitUntil(lambda: len(daemon.changes()) == 3, timeout=3000)
    assert {k: v for k, v in daemon.changes()[2].items() if k != "id"} == {
        "cmd": "remove-link",
        "link": "enx0c5b",
    }  # and no set-order: the others kept their order
    assert [x["name"] for x in daemon.status()["links"]] == ["eth0", "wlan0", "usb0"]


def test_an_added_interface_is_not_sent_on_cancel(qtbot, daemon, dialog) -> None:
    page = dialog.links_page
    qtbot.waitUntil(lambda: page.add_button.isEnabled(), timeout=3000)
    page.add_button.click()
    assert page.model.rowCount() == 4
    dialog.reject()
    with qtbot.assertNotEmitted(dialog.session.client.reply, wait=300):
        pass
    assert daemon.changes() == []


def model_set(page, row: int, key: str, value) -> bool:
    return page.model.setData(page.model.index(row, page.model.column_of(key)), value)


@pytest.fixture
def bypass_dialog(qtbot, daemon, session: Session, monkeypatch) -> SettingsDialog:
    """The dialog on a daemon that offers the bypass list, declared as braidd declares it."""
    import fake_braidd

    from braid.daemon.settings import BY_KEY

    monkeypatch.setattr(fake_braidd, "SCHEMA", [*fake_braidd.SCHEMA, BY_KEY["bypass"].describe()])
    daemon.settings["bypass"] = ["192.0.2.0/24"]
    window = SettingsDialog(session, IconSet(), session.tokens)
    qtbot.addWidget(window)
    window.show()
    qtbot.waitUntil(lambda: "Traffic" in window.daemon_forms, timeout=3000)
    return window


def test_the_traffic_page_edits_the_domain_list(qtbot, daemon, bypass_dialog) -> None:
    form = bypass_dialog.daemon_forms["Traffic"]
    edit = form.widgets["bypass"]
    assert edit.isEnabled() and edit.toPlainText() == "192.0.2.0/24"
    edit.setPlainText("192.0.2.0/24\nnetflix.com\n\n  bank.example  \n")
    assert not form.errors["bypass"].isVisible()
    bypass_dialog.accept()
    qtbot.waitUntil(lambda: daemon.settings["bypass"] != ["192.0.2.0/24"], timeout=3000)
    assert daemon.settings["bypass"] == ["192.0.2.0/24", "netflix.com", "bank.example"]
    assert not bypass_dialog.isVisible()


def test_a_bad_domain_is_named_and_nothing_is_sent(qtbot, daemon, bypass_dialog) -> None:
    form = bypass_dialog.daemon_forms["Traffic"]
    bypass_dialog.select_page("General")
    form.widgets["bypass"].setPlainText("netflix.com\nnot a domain")
    error = form.errors["bypass"]
    assert "'not a domain' is not an address" in error.text()
    bypass_dialog.accept()
    assert bypass_dialog.isVisible()
    assert bypass_dialog.stack.currentIndex() == bypass_dialog.PAGES.index("Traffic")
    assert error.isVisible()
    assert daemon.commands("set-settings") == []
    # Fixed, it goes.
    form.widgets["bypass"].setPlainText("netflix.com")
    assert not error.isVisible()
    bypass_dialog.accept()
    qtbot.waitUntil(lambda: daemon.settings["bypass"] == ["netflix.com"], timeout=3000)
