"""The settings dialog: the server, the links, the traffic, the tray itself.

Nothing is sent or saved until OK: Cancel leaves the daemon and the files as they were.
The Traffic, Advanced and General pages are generated from the declarations in
braid.gui.preferences (and the daemon's own schema); Server and Links are made by hand
because they do more than hold values.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from PySide6.QtCore import QModelIndex, QPersistentModelIndex, Qt, Signal
from PySide6.QtGui import QFont, QFontDatabase, QPalette
from PySide6.QtWidgets import (
    QAbstractItemView,
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QPlainTextEdit,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QStackedWidget,
    QStyledItemDelegate,
    QStyleOptionViewItem,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from braid.gui import autostart
from braid.gui.icons import IconSet
from braid.gui.model import (
    CHOICES_ROLE,
    KIND_LABELS,
    SETTINGS_COLUMNS,
    LinkTableModel,
    link_changes,
)
from braid.gui.preferences import DAEMON, LOCAL_SETTINGS, SavedPairing, SettingSpec, daemon_specs
from braid.gui.session import Session
from braid.gui.tokens import TokenStore
from braid.protocol.pairing import Pairing, PairingError, parse_pairing

log = logging.getLogger(__name__)

ERROR_COLOUR = "#c01c28"
OK_COLOUR = "#26a269"


def _muted(label: QLabel) -> QLabel:
    palette = label.palette()
    palette.setColor(
        QPalette.ColorRole.WindowText, palette.color(QPalette.ColorRole.PlaceholderText)
    )
    label.setPalette(palette)
    label.setWordWrap(True)
    return label


def _intro(text: str) -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    label.setTextFormat(Qt.TextFormat.RichText)
    return label


def _page_title(text: str) -> QLabel:
    label = QLabel(text)
    font = label.font()
    font.setPointSizeF(font.pointSizeF() * 1.25)
    font.setWeight(QFont.Weight.DemiBold)
    label.setFont(font)
    return label


def group_fingerprint(fp: str) -> str:
    """64 hex digits in blocks of four, two lines: easier to compare with the server's."""
    blocks = [fp[i : i + 4] for i in range(0, len(fp), 4)]
    return " ".join(blocks[:8]) + "\n" + " ".join(blocks[8:])


# -- pages generated from declarations ----------------------------------------------


class SettingsForm(QWidget):
    """A form built from SettingSpecs: a check box, a number, choices, a list or a text each."""

    def __init__(
        self, specs: list[SettingSpec], values: dict[str, Any], parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.specs = {spec.key: spec for spec in specs}
        self._read: dict[str, Any] = {}
        self.widgets: dict[str, QWidget] = {}
        self.errors: dict[str, QLabel] = {}  # under each field that has a check
        # A grid, not a QFormLayout: wrapped help texts in a form's nested layouts get
        # heights for the wrong width, and gaps open under check boxes.
        grid = QGridLayout(self)
        grid.setContentsMargins(0, 0, 0, 0)
        grid.setHorizontalSpacing(18)
        grid.setVerticalSpacing(4)
        grid.setColumnStretch(1, 1)
        row = 0
        for spec in specs:
            value = values.get(spec.key, spec.default)
            field, read = self._field(spec, value)
            self._read[spec.key] = read
            self.widgets[spec.key] = field
            help_text = spec.help
            if not spec.supported:
                field.setEnabled(False)
                help_text += " (The running daemon does not offer this setting yet.)"
            if spec.type is not bool:
                label = QLabel(spec.label)
                label.setBuddy(field)
                grid.addWidget(
                    label, row, 0, Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop
                )
            if isinstance(field, QSpinBox | QDoubleSpinBox):
                # Aligned, so its narrow maximum does not narrow the whole column.
                grid.addWidget(field, row, 1, Qt.AlignmentFlag.AlignLeft)
            else:
                grid.addWidget(field, row, 1)
            if help_text:
                grid.addWidget(_muted(QLabel(help_text)), row + 1, 1)
            if spec.check is not None and spec.supported:
                error = QLabel()
                error.setWordWrap(True)
                error.setStyleSheet(f"color: {ERROR_COLOUR}")
                error.hide()
                self.errors[spec.key] = error
                grid.addWidget(error, row + 2, 1)
                if isinstance(field, QPlainTextEdit):
                    field.textChanged.connect(lambda key=spec.key: self.problems([key]))
            grid.setRowMinimumHeight(row + 3, 14)  # air between settings
            row += 4
        grid.setRowStretch(row, 1)

    def _field(self, spec: SettingSpec, value: Any) -> tuple[QWidget, Any]:
        if spec.type is bool:
            box = QCheckBox(spec.label)
            box.setChecked(bool(value))
            return box, box.isChecked
        if spec.type in (int, float):
            spin: QSpinBox | QDoubleSpinBox = QSpinBox() if spec.type is int else QDoubleSpinBox()
            spin.setRange(
                spec.minimum if spec.minimum is not None else -(2**31),
                spec.maximum if spec.maximum is not None else 2**31 - 1,
            )
            spin.setValue(value if value is not None else 0)
            spin.setMinimumWidth(110)
            spin.setMaximumWidth(160)
            return spin, spin.value
        if spec.type is list:
            edit = QPlainTextEdit("\n".join(str(v) for v in value or []))
            edit.setFixedHeight(84)
            edit.setPlaceholderText("one per line")
            return edit, lambda: [
                line.strip() for line in edit.toPlainText().splitlines() if line.strip()
            ]
        if spec.choices and len(spec.choices) <= 3:
            holder = QWidget()
            rows = QVBoxLayout(holder)
            rows.setContentsMargins(0, 0, 0, 0)
            rows.setSpacing(4)
            group = QButtonGroup(holder)
            buttons: dict[str, QRadioButton] = {}
            for choice, text in spec.choices:
                why = spec.unavailable.get(choice) or (
                    spec.not_yet.get(choice) if not spec.supported else None
                )
                button = QRadioButton(f"{text} ({why})" if why else text)
                button.setEnabled(why is None)
                group.addButton(button)
                rows.addWidget(button)
                buttons[choice] = button
            buttons.get(value, next(iter(buttons.values()))).setChecked(True)
            return holder, lambda: next(
                (choice for choice, button in buttons.items() if button.isChecked()), value
            )
        if spec.choices:
            combo = QComboBox()
            for choice, text in spec.choices:
                combo.addItem(text, choice)
            combo.setCurrentIndex(max(0, combo.findData(value)))
            return combo, combo.currentData
        edit = QLineEdit("" if value is None else str(value))
        return edit, edit.text

    def values(self) -> dict[str, Any]:
        return {key: read() for key, read in self._read.items() if self.specs[key].supported}

    def problems(self, keys: list[str] | None = None) -> dict[str, str]:
        """What the checked fields' values are refused for, shown under each field."""
        found: dict[str, str] = {}
        for key in keys or list(self.errors):
            spec, label = self.specs[key], self.errors[key]
            try:
                spec.check(self._read[key]())  # type: ignore[misc] - only checked specs have a label
            except ValueError as exc:
                found[key] = str(exc)
                label.setText(f"✗ {exc}")
                label.show()
            else:
                label.hide()
        return found

    def set_value(self, key: str, value: Any) -> None:
        """Set a field as the user would (for the tests and for defaults)."""
        widget = self.widgets[key]
        if isinstance(widget, QCheckBox):
            widget.setChecked(bool(value))
        elif isinstance(widget, QSpinBox | QDoubleSpinBox):
            widget.setValue(value)
        elif isinstance(widget, QPlainTextEdit):
            widget.setPlainText("\n".join(value))
        elif isinstance(widget, QComboBox):
            widget.setCurrentIndex(widget.findData(value))
        elif isinstance(widget, QLineEdit):
            widget.setText(str(value))
        else:
            for button in widget.findChildren(QRadioButton):
                label = dict(self.specs[key].choices).get(value, "")
                if button.text().startswith(label):
                    button.setChecked(True)


# -- the links page's editors ----------------------------------------------------------


class ChoiceDelegate(QStyledItemDelegate):
    """A combo box for the columns whose model offers choices (priority, period, at cap)."""

    def createEditor(
        self, parent: QWidget, option: QStyleOptionViewItem, index: QModelIndex
    ) -> QWidget:
        choices = index.data(CHOICES_ROLE)
        if choices:
            combo = QComboBox(parent)
            for value, label in choices:
                combo.addItem(label, value)
            combo.activated.connect(lambda _=0, c=combo: self.commitData.emit(c))
            return combo
        if isinstance(index.data(Qt.ItemDataRole.EditRole), int):  # the reset day
            spin = QSpinBox(parent)
            spin.setRange(1, 28)
            return spin
        return super().createEditor(parent, option, index)

    def setEditorData(self, editor: QWidget, index: QModelIndex | QPersistentModelIndex) -> None:
        if isinstance(editor, QComboBox):
            editor.setCurrentIndex(max(0, editor.findData(index.data(Qt.ItemDataRole.EditRole))))
        else:
            super().setEditorData(editor, index)

    def setModelData(self, editor: QWidget, model, index) -> None:
        if isinstance(editor, QComboBox):
            model.setData(index, editor.currentData(), Qt.ItemDataRole.EditRole)
        else:
            super().setModelData(editor, model, index)


class LinksPage(QWidget):
    """Every link: order by dragging (or the buttons), priority, metered, cap."""

    def __init__(self, session: Session, icons: IconSet, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.original = session.links
        self.model = LinkTableModel(
            session.colours, icons, SETTINGS_COLUMNS, editable=True, parent=self
        )
        self.model.set_links(self.original)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(10)
        layout.addWidget(_page_title("Links"))
        layout.addWidget(
            _intro(
                "Drag a link up or down to set the order new connections try them in. "
                "<b>Always</b> carries traffic, <b>Backup</b> only when no Always link works, "
                "<b>Never</b> leaves the link alone. A data cap turns a link into Backup or "
                "Never once it is used up. An interface Braid skipped can be added below; "
                "<b>Remove</b> forgets one you added."
            )
        )
        self.table = QTableView()
        self.table.setModel(self.model)
        self.table.setItemDelegate(ChoiceDelegate(self.table))
        self.table.verticalHeader().hide()
        self.table.setShowGrid(False)
        self.table.setAlternatingRowColors(True)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setDragDropMode(QAbstractItemView.DragDropMode.InternalMove)
        self.table.setDragDropOverwriteMode(False)
        self.table.setDefaultDropAction(Qt.DropAction.MoveAction)
        self.table.setDropIndicatorShown(True)
        self.table.setEditTriggers(
            QAbstractItemView.EditTrigger.DoubleClicked
            | QAbstractItemView.EditTrigger.SelectedClicked
            | QAbstractItemView.EditTrigger.EditKeyPressed
        )
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        header.setDefaultAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter)
        self.table.verticalHeader().setDefaultSectionSize(34)
        layout.addWidget(self.table, 1)

        buttons = QHBoxLayout()
        self.up_button = QPushButton("Move up")
        self.down_button = QPushButton("Move down")
        self.up_button.clicked.connect(lambda: self._move(-1))
        self.down_button.clicked.connect(lambda: self._move(+1))
        self.remove_button = QPushButton("Remove")
        self.remove_button.setToolTip("Stop using an interface you added")
        self.remove_button.setEnabled(False)
        self.remove_button.clicked.connect(self._remove)
        buttons.addWidget(self.up_button)
        buttons.addWidget(self.down_button)
        buttons.addWidget(self.remove_button)
        buttons.addStretch(1)
        self.message = QLabel()
        self.message.setStyleSheet(f"color: {ERROR_COLOUR}")
        buttons.addWidget(self.message)
        layout.addLayout(buttons)

        # Interfaces braidd skipped (a veth, a modem it does not know) can be made links.
        adding = QHBoxLayout()
        adding.addWidget(QLabel("Use an interface Braid skipped:"))
        self.interface_box = QComboBox()
        self.interface_box.setMinimumContentsLength(24)
        self.interface_box.setPlaceholderText("asking the daemon…")
        self.kind_box = QComboBox()
        for kind, label in KIND_LABELS.items():
            self.kind_box.addItem(label, kind)
        self.interface_box.currentIndexChanged.connect(self._guess_kind)
        self.add_button = QPushButton("Add")
        self.add_button.setEnabled(False)
        self.add_button.clicked.connect(self._add)
        adding.addWidget(self.interface_box, 1)
        adding.addWidget(self.kind_box)
        adding.addWidget(self.add_button)
        layout.addLayout(adding)
        self.added: dict[str, str] = {}  # interface → kind, added on OK
        self.removed: list[str] = []  # links the user added before, removed on OK
        self._initial: dict[str, dict[str, Any]] = {}  # an added row as it was made

        if not self.original:
            self.message.setText("No links yet: is the daemon running?")
        self.model.invalid.connect(self.message.setText)
        self.model.rowsMoved.connect(self._open_editors)
        self.model.modelReset.connect(self._open_editors)
        self.table.selectionModel().selectionChanged.connect(self._selected)
        self.model.modelReset.connect(self._selected)
        self._open_editors()
        self._client = session.client
        self._client.reply.connect(self._on_reply)
        self._interfaces_request: int | None = self._client.interfaces()
        self._interfaces: list[dict[str, Any]] = []

    def _open_editors(self, *_: object) -> None:
        """Priority as a visible drop-down on every row: the one choice everybody makes."""
        column = self.model.column_of("priority")
        for row in range(self.model.rowCount()):
            index = self.model.index(row, column)
            if self.table.isPersistentEditorOpen(index):
                self.table.closePersistentEditor(index)
            self.table.openPersistentEditor(index)

    def _move(self, offset: int) -> None:
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return
        row = rows[0].row()
        if self.model.move(row, offset):
            self.table.selectRow(row + offset)

    # -- adding and removing interfaces ------------------------------------------------

    def _on_reply(self, request_id: int, ok: bool, result: object) -> None:
        if request_id != self._interfaces_request:
            return
        self._interfaces_request = None
        if not ok or not isinstance(result, list):
            message = result.get("message") if isinstance(result, dict) else str(result)
            self.interface_box.setPlaceholderText("unknown")
            self.message.setText(f"The daemon's interfaces could not be read: {message}")
            return
        self._interfaces = [i for i in result if isinstance(i, dict) and not i.get("link")]
        self._fill_interfaces()

    def _fill_interfaces(self) -> None:
        self.interface_box.clear()
        shown = set(self.model.names())
        for item in self._interfaces:
            name = str(item.get("name"))
            if name not in shown:
                self.interface_box.addItem(f"{name} — {item.get('reason', '')}", name)
        if self.interface_box.count():
            self.interface_box.setCurrentIndex(0)
        else:
            self.interface_box.setPlaceholderText("none: every interface is a link")
        self.add_button.setEnabled(self.interface_box.count() > 0)

    def _guess_kind(self, *_: object) -> None:
        name = self.interface_box.currentData()
        kind = next((i.get("kind") for i in self._interfaces if i.get("name") == name), None)
        index = self.kind_box.findData(kind)
        if index >= 0:
            self.kind_box.setCurrentIndex(index)

    def _add(self) -> None:
        name = self.interface_box.currentData()
        if not name:
            return
        kind = str(self.kind_box.currentData())
        priority = "backup" if kind == "cellular" else "always"  # as braidd decides for a kind
        row = {
            "name": name,
            "kind": kind,
            "priority": priority,
            "effective_priority": priority,
            "order": self.model.rowCount(),
            "state": "down",
            "metered": kind == "cellular",
            "cap": None,
            "added": True,
        }
        self.added[name] = kind
        self._initial[name] = dict(row)
        self.model.set_links([*self.model.links(), row])
        self._fill_interfaces()
        self.message.setText("")

    def _selected(self, *_: object) -> None:
        rows = self.table.selectionModel().selectedRows()
        links = self.model.links()
        chosen = links[rows[0].row()] if rows and rows[0].row() < len(links) else None
        self.remove_button.setEnabled(bool(chosen and chosen.get("added")))

    def _remove(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return
        links = self.model.links()
        name = str(links[rows[0].row()].get("name"))
        if not links[rows[0].row()].get("added"):
            return
        if name in self.added:
            del self.added[name]
            del self._initial[name]
        else:
            self.removed.append(name)
        self.model.set_links([link for link in links if link.get("name") != name])
        self._fill_interfaces()

    def changes(self) -> tuple[list[tuple[str, dict[str, Any]]], list[str] | None]:
        """set-link arguments and the new order; added interfaces count from how they were added
        (a priority changed after Add is sent), removed ones are left out."""
        before = [*self.original, *self._initial.values()]
        changes, order = link_changes(before, self.model.links())
        kept = [str(link.get("name")) for link in before if link.get("name") not in self.removed]
        return changes, (None if order == kept else order)


# -- the server page ---------------------------------------------------------------------


class ServerPage(QWidget):
    """Pairing: paste or open the URI, see what it says, test it."""

    def __init__(self, session: Session, tokens: TokenStore, parent: QWidget | None = None):
        super().__init__(parent)
        self.session = session
        self.tokens = tokens
        self.pairing: Pairing | None = None
        self._test_request: int | None = None
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(10)
        layout.addWidget(_page_title("Server"))
        layout.addWidget(
            _intro(
                "Paste the pairing URI that <code>braid-server init</code> printed on your "
                "server, or open a file that holds it."
            )
        )
        row = QHBoxLayout()
        self.uri = QPlainTextEdit()
        self.uri.setPlaceholderText("braid://your.server.example:7443?fp=…&token=…")
        self.uri.setFixedHeight(64)
        self.uri.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        self.uri.textChanged.connect(self._validate)
        row.addWidget(self.uri, 1)
        self.open_button = QPushButton("Open file…")
        self.open_button.clicked.connect(self.open_file)
        row.addWidget(self.open_button, 0, Qt.AlignmentFlag.AlignTop)
        layout.addLayout(row)
        self.verdict = QLabel()
        self.verdict.setWordWrap(True)
        layout.addWidget(self.verdict)

        form = QFormLayout()
        form.setHorizontalSpacing(18)
        form.setVerticalSpacing(8)
        self.server_label = QLabel("–")
        self.fingerprint_label = QLabel("–")
        self.fingerprint_label.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        self.token_label = _muted(QLabel("–"))
        for label in (self.server_label, self.fingerprint_label):
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        form.addRow("Server", self.server_label)
        form.addRow("Certificate", self.fingerprint_label)
        form.addRow("Token", self.token_label)
        layout.addLayout(form)

        test_row = QHBoxLayout()
        self.test_button = QPushButton("Test connection")
        self.test_button.clicked.connect(self.test_connection)
        test_row.addWidget(self.test_button)
        self.test_result = QLabel()
        self.test_result.setWordWrap(True)
        self.test_result.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        test_row.addWidget(self.test_result, 1)
        layout.addLayout(test_row)
        layout.addStretch(1)
        session.client.reply.connect(self._on_reply)
        self._show_current()

    def _show_current(self) -> None:
        saved = self.session.preferences.pairing()
        status = self.session.status
        if saved is not None:
            self.server_label.setText(saved.server)
            self.fingerprint_label.setText(group_fingerprint(saved.fingerprint))
            where = "in your keyring" if self.tokens.backend_name() else "in a private file"
            self.token_label.setText(f"saved {where}")
        elif status.get("server"):
            self.server_label.setText(f"{status['server']} (paired through the daemon)")
            if status.get("fingerprint"):
                self.fingerprint_label.setText(group_fingerprint(str(status["fingerprint"])))
            self.token_label.setText("kept by the daemon")
        else:
            self.server_label.setText("not paired yet")
        self.test_button.setEnabled(bool(saved or status.get("server")))

    def _validate(self) -> None:
        text = self.uri.toPlainText().strip()
        self.pairing = None
        if not text:
            self.verdict.clear()
            self._show_current()
            return
        try:
            self.pairing = parse_pairing(text)
        except PairingError as exc:
            self.verdict.setText(f"<span style='color:{ERROR_COLOUR}'>✗ {exc}</span>")
            self.test_button.setEnabled(False)
            return
        backend = self.tokens.backend_name()
        self.verdict.setText(
            f"<span style='color:{OK_COLOUR}'>✓ A valid pairing: OK saves it.</span>"
        )
        self.server_label.setText(self.pairing.server)
        self.fingerprint_label.setText(group_fingerprint(self.pairing.fingerprint))
        self.token_label.setText(
            f"will be saved in your keyring ({backend})"
            if backend
            else "no keyring is available: it will be saved in a file only you can read"
        )
        self.test_button.setEnabled(True)

    @property
    def invalid(self) -> bool:
        """Text was entered that is not a pairing: OK must not pretend it was saved."""
        return bool(self.uri.toPlainText().strip()) and self.pairing is None

    def open_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Open a pairing", str(Path.home()), "Pairing (*.txt *.uri);;All files (*)"
        )
        if not path:
            return
        try:
            text = Path(path).read_text(errors="replace")
        except OSError as exc:
            self.verdict.setText(f"<span style='color:{ERROR_COLOUR}'>✗ {exc.strerror}</span>")
            return
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        uri = next((line for line in lines if line.startswith("braid://")), text.strip())
        self.uri.setPlainText(uri)

    def test_connection(self) -> None:
        uri = self.pairing.uri() if self.pairing else None
        self.test_button.setEnabled(False)
        self.test_result.setText("Connecting…")
        self._test_request = self.session.test_pairing(uri)

    def _on_reply(self, request_id: int, ok: bool, result: object) -> None:
        if request_id != self._test_request:
            return
        self._test_request = None
        self.test_button.setEnabled(True)
        if ok:
            reply = result if isinstance(result, dict) else {}
            text = f"✓ Reached {reply.get('server', 'the server')}"
            if isinstance(reply.get("elapsed_ms"), (int, float)):
                text += f" in {reply['elapsed_ms']:.0f} ms"
            if reply.get("link"):
                text += f" over {reply['link']}"
            self.test_result.setText(f"<span style='color:{OK_COLOUR}'>{text}</span>")
        else:
            message = result.get("message") if isinstance(result, dict) else str(result)
            self.test_result.setText(f"<span style='color:{ERROR_COLOUR}'>✗ {message}</span>")

    def save(self) -> str | None:
        """Keep a newly entered pairing: token to the keyring, the rest to the preferences."""
        if self.pairing is None:
            return None
        where = self.tokens.save(self.pairing.server, self.pairing.token)
        self.session.preferences.set_pairing(
            SavedPairing(self.pairing.host, self.pairing.port, self.pairing.fingerprint)
        )
        in_keyring = self.tokens.backend_name() is not None and "keyring" in where
        self.session.note(
            f"Paired with {self.pairing.server}. {where}", "info" if in_keyring else "warning"
        )
        return where


# -- the dialog --------------------------------------------------------------------------


class SettingsDialog(QDialog):
    """Pages on the left, OK applies everything at once, Cancel nothing."""

    applied = Signal()  # after OK: the tray redraws with the new preferences

    PAGES = ("Server", "Links", "Traffic", "General", "Advanced")

    def __init__(
        self, session: Session, icons: IconSet, tokens: TokenStore, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.session = session
        self.setWindowTitle("Braid settings")
        self.setWindowIcon(icons.app())
        self.resize(860, 580)
        self.setMinimumSize(720, 480)
        self._settings_request: int | None = None
        self.daemon_values: dict[str, Any] = {}
        self.daemon_forms: dict[str, SettingsForm] = {}

        self.sidebar = QListWidget()
        self.sidebar.setFixedWidth(150)
        self.sidebar.setSpacing(2)
        self.sidebar.setFrameShape(QListWidget.Shape.NoFrame)
        self.sidebar.setStyleSheet("QListWidget::item { padding: 7px 10px; }")
        self.stack = QStackedWidget()
        self.sidebar.currentRowChanged.connect(self.stack.setCurrentIndex)

        self.server_page = ServerPage(session, tokens)
        self.links_page = LinksPage(session, icons)
        local_values = session.preferences.values()
        local_values["start_at_login"] = autostart.is_enabled()
        self.general_form = SettingsForm(list(LOCAL_SETTINGS), local_values)
        self._traffic_holder = self._placeholder("Traffic", "Asking the daemon for its settings…")
        self._advanced_holder = self._placeholder("Advanced", "Asking the daemon…")
        pages = {
            "Server": self.server_page,
            "Links": self.links_page,
            "Traffic": self._traffic_holder,
            "General": self._generated("General", self.general_form),
            "Advanced": self._advanced_holder,
        }
        for name in self.PAGES:
            self.sidebar.addItem(name)
            self.stack.addWidget(pages[name])

        buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel
        )
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        self.buttons = buttons

        body = QHBoxLayout()
        body.setSpacing(18)
        body.addWidget(self.sidebar)
        body.addWidget(self.stack, 1)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(14, 14, 14, 12)
        outer.setSpacing(12)
        outer.addLayout(body, 1)
        outer.addWidget(buttons)
        self.sidebar.setCurrentRow(0)

        session.client.reply.connect(self._on_reply)
        self._settings_request = session.client.get_settings()

    # -- pages ----------------------------------------------------------------------

    def _placeholder(self, title: str, text: str) -> QWidget:
        page = QWidget()
        layout = QVBoxLayout(page)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(_page_title(title))
        page.note = _muted(QLabel(text))  # type: ignore[attr-defined]
        layout.addWidget(page.note)  # type: ignore[attr-defined]
        layout.addStretch(1)
        return page

    def _generated(self, title: str, form: SettingsForm, note: str = "") -> QWidget:
        page = QWidget()
        layout = QVBoxLayout(page)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(12)
        layout.addWidget(_page_title(title))
        if note:
            layout.addWidget(_muted(QLabel(note)))
        layout.addWidget(form)
        layout.addStretch(1)
        return page

    def _replace_page(self, name: str, page: QWidget) -> None:
        index = self.PAGES.index(name)
        old = self.stack.widget(index)
        self.stack.insertWidget(index, page)
        self.stack.removeWidget(old)
        old.deleteLater()
        self.stack.setCurrentIndex(self.sidebar.currentRow())

    def select_page(self, name: str) -> None:
        self.sidebar.setCurrentRow(self.PAGES.index(name))

    def _on_reply(self, request_id: int, ok: bool, result: object) -> None:
        if request_id != self._settings_request:
            return
        self._settings_request = None
        if not ok or not isinstance(result, dict):
            message = result.get("message") if isinstance(result, dict) else str(result)
            schema: list[dict[str, Any]] = []
            note = f"The daemon's settings could not be read: {message}"
        else:
            schema = list(result.get("schema") or [])
            self.daemon_values = dict(result.get("values") or {})
            note = ""
        specs = daemon_specs(schema)
        for page, title, intro in (
            ("Traffic", "Traffic", "What goes through Braid, and how."),
            ("Advanced", "Advanced", "The daemon's other settings. The defaults suit most people."),
        ):
            mine = [spec for spec in specs if spec.page == page]
            form = SettingsForm(mine, self.daemon_values)
            self.daemon_forms[page] = form
            self._replace_page(page, self._generated(title, form, note or intro))

    # -- applying ---------------------------------------------------------------------

    def daemon_changes(self) -> dict[str, Any]:
        changes: dict[str, Any] = {}
        for form in self.daemon_forms.values():
            for key, value in form.values().items():
                if form.specs[key].scope == DAEMON and value != self.daemon_values.get(key):
                    changes[key] = value
        return changes

    def accept(self) -> None:
        if self.server_page.invalid:
            self.select_page("Server")
            self.server_page.uri.setFocus()
            return  # the page says what is wrong; nothing is applied
        for page, form in self.daemon_forms.items():
            problems = form.problems()
            if problems:
                self.select_page(page)
                form.widgets[next(iter(problems))].setFocus()
                return  # the field says what is wrong; nothing is applied
        client = self.session.client
        self.server_page.save()
        for name in self.links_page.removed:
            client.remove_link(name)
        for name, kind in self.links_page.added.items():
            client.add_link(name, kind)
        changes, order = self.links_page.changes()
        if order is not None:
            client.set_order(order)
        for name, diff in changes:
            client.set_link(name, **diff)
        daemon = self.daemon_changes()
        if daemon:
            client.set_settings(daemon)
        preferences = self.session.preferences
        for key, value in self.general_form.values().items():
            if key == "start_at_login":
                autostart.set_enabled(bool(value))
            preferences.set_value(key, value)
        self.applied.emit()
        super().accept()
