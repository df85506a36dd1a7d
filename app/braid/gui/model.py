"""The links as a Qt table: what the dashboard shows and what the settings dialog edits.

One model, two column sets. The dashboard's is read-only and follows every sample; the
dialog's holds a copy the user edits (priority, metered, cap) and reorders by dragging,
and the dialog sends only the differences when it is accepted.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import (
    QAbstractTableModel,
    QByteArray,
    QMimeData,
    QModelIndex,
    QPersistentModelIndex,
    Qt,
    Signal,
)
from PySide6.QtGui import QColor

from braid.gui.colours import LinkColours
from braid.gui.icons import IconSet
from braid.units import format_bytes, format_loss, format_ms, format_rate, parse_size

MIME_TYPE = "application/x-braid-link-names"
CHOICES_ROLE = Qt.ItemDataRole.UserRole + 1  # [(value, label)] for a choice column's editor
NAME_ROLE = Qt.ItemDataRole.UserRole + 2  # the link's name, whatever the column

PRIORITIES = (("always", "Always"), ("backup", "Backup"), ("never", "Never"))
PERIODS = (("month", "Month"), ("day", "Day"))
AT_CAP = (("backup", "Backup"), ("never", "Never"))
KIND_LABELS = {"ethernet": "Ethernet", "wifi": "Wi-Fi", "cellular": "Cellular", "other": "Other"}
STATE_LABELS = {"up": "Up", "no-address": "No address", "down": "Down", "missing": "Missing"}
DEFAULT_CAP = {"limit_bytes": 10_000_000_000, "period": "month", "reset_day": 1, "then": "never"}

Index = QModelIndex | QPersistentModelIndex


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    numeric: bool = False
    tip: str = ""


COLUMNS = {
    column.key: column
    for column in (
        Column("link", "Link", tip="The interface, coloured as in the graphs"),
        Column("kind", "Kind"),
        Column("state", "State", tip="Carrier and health probes"),
        Column("rx", "Download", True),
        Column("tx", "Upload", True),
        Column("rtt", "RTT", True, "Round trip to the server through this link"),
        Column("jitter", "Jitter", True, "How much the round trip varies"),
        Column("loss", "Loss", True, "Health probes lost"),
        Column(
            "priority",
            "Priority",
            tip="Always: carries traffic. Backup: only when no Always link works. Never: unused.",
        ),
        Column("used", "Data used", True, "Both directions, this period"),
        Column(
            "metered",
            "Metered",
            tip="A link you pay by the byte (a phone): new links like it start as Backup",
        ),
        Column("cap", "Data cap", True, "Allowance per period; empty for none (e.g. 10 GB)"),
        Column("period", "Per"),
        Column("reset_day", "Resets on", True, "Day of the month the allowance starts again"),
        Column("then", "At the cap", tip="What the link becomes once the cap is reached"),
    )
}
DASHBOARD_COLUMNS = ("link", "state", "rx", "tx", "rtt", "jitter", "loss", "priority", "used")
SETTINGS_COLUMNS = ("link", "kind", "priority", "metered", "cap", "period", "reset_day", "then")
_EDITABLE = {"priority", "metered", "cap", "period", "reset_day", "then"}
_CAP_FIELDS = {"period", "reset_day", "then"}


def _label(choices: tuple[tuple[str, str], ...], value: Any) -> str:
    return next((label for v, label in choices if v == value), str(value))


class LinkTableModel(QAbstractTableModel):
    """Rows are link objects as the daemon reports them, in the daemon's order."""

    invalid = Signal(str)  # an edit was refused: why, for the dialog to show

    def __init__(
        self,
        colours: LinkColours,
        icons: IconSet,
        columns: tuple[str, ...] = DASHBOARD_COLUMNS,
        editable: bool = False,
        parent: Any = None,
    ) -> None:
        super().__init__(parent)
        self.colours = colours
        self.icons = icons
        self.columns = [COLUMNS[key] for key in columns]
        self.editable = editable
        self._rows: list[dict[str, Any]] = []
        self._shown: list[list[Any]] = []

    # -- contents ---------------------------------------------------------------

    def set_links(self, links: list[dict[str, Any]]) -> None:
        """Follow the daemon: update in place when the same links come, reset otherwise."""
        links = [copy.deepcopy(link) for link in links if isinstance(link, dict)]
        shown = [self._render(link) for link in links]
        if [row.get("name") for row in self._rows] == [link.get("name") for link in links]:
            old, self._rows, self._shown = self._shown, links, shown
            # Only cells whose text changed are repainted: a sample a second moves the
            # rates, rarely the rest.
            for row, (before, after) in enumerate(zip(old, shown, strict=True)):
                changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
                if changed:
                    self.dataChanged.emit(self.index(row, changed[0]), self.index(row, changed[-1]))
            return
        self.beginResetModel()
        self._rows, self._shown = links, shown
        self.endResetModel()

    def _render(self, row: dict[str, Any]) -> list[Any]:
        """What each cell shows, worked out once per update instead of at every paint."""
        return [
            (self._display(row, c.key), self._state_colour(row), row.get("capped"))
            for c in self.columns
        ]

    def links(self) -> list[dict[str, Any]]:
        return copy.deepcopy(self._rows)

    def names(self) -> list[str]:
        return [str(row.get("name")) for row in self._rows]

    def column_of(self, key: str) -> int:
        return next(i for i, column in enumerate(self.columns) if column.key == key)

    # -- reading ----------------------------------------------------------------

    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008 - Qt's API
        return 0 if parent.isValid() else len(self._rows)

    def columnCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.columns)

    def headerData(
        self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole
    ) -> Any:
        if orientation != Qt.Orientation.Horizontal or not 0 <= section < len(self.columns):
            return None
        column = self.columns[section]
        if role == Qt.ItemDataRole.DisplayRole:
            return column.title
        if role == Qt.ItemDataRole.ToolTipRole:
            return column.tip or None
        if role == Qt.ItemDataRole.TextAlignmentRole and column.numeric:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or not 0 <= index.row() < len(self._rows):
            return None
        if not 0 <= index.column() < len(self.columns):
            return None
        row = self._rows[index.row()]
        key = self.columns[index.column()].key
        if role == Qt.ItemDataRole.DisplayRole:
            return self._shown[index.row()][index.column()][0]
        if role == Qt.ItemDataRole.EditRole:
            return self._edit_value(row, key)
        if role == Qt.ItemDataRole.DecorationRole:
            if key == "link":
                return self.icons.kind(
                    str(row.get("kind", "other")), self.colours.colour(str(row["name"]))
                )
            if key == "state":
                return self.icons.dot(self._state_colour(row))
            return None
        if role == Qt.ItemDataRole.CheckStateRole and key == "metered":
            return Qt.CheckState.Checked if row.get("metered") else Qt.CheckState.Unchecked
        if role == Qt.ItemDataRole.TextAlignmentRole and self.columns[index.column()].numeric:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        if role == Qt.ItemDataRole.ToolTipRole:
            return self._tooltip(row, key)
        if role == Qt.ItemDataRole.ForegroundRole and key == "priority" and row.get("capped"):
            return QColor("#c64600")
        if role == CHOICES_ROLE:
            return {"priority": PRIORITIES, "period": PERIODS, "then": AT_CAP}.get(key)
        if role == NAME_ROLE:
            return row.get("name")
        return None

    def _display(self, row: dict[str, Any], key: str) -> str | None:
        cap = row.get("cap") or None
        match key:
            case "link":
                return str(row.get("name", ""))
            case "kind":
                return KIND_LABELS.get(str(row.get("kind")), str(row.get("kind", "")))
            case "state":
                state = STATE_LABELS.get(str(row.get("state")), str(row.get("state", "")))
                if row.get("state") == "up" and row.get("connectivity") == "portal":
                    return "Sign-in required"
                if row.get("state") == "up" and row.get("alive") is False:
                    return "Not answering"
                return state
            case "rx":
                return format_rate(row.get("rx_bps"))
            case "tx":
                return format_rate(row.get("tx_bps"))
            case "rtt":
                return format_ms(row.get("rtt_ms"))
            case "jitter":
                return format_ms(row.get("jitter_ms"))
            case "loss":
                return format_loss(row.get("loss"))
            case "priority":
                text = _label(PRIORITIES, row.get("priority"))
                effective = row.get("effective_priority", row.get("priority"))
                if effective != row.get("priority"):
                    text += f" → {_label(PRIORITIES, effective)} (over cap)"
                return text
            case "used":
                used = format_bytes(row.get("used_bytes") or 0)
                return f"{used} / {format_bytes(cap['limit_bytes'])}" if cap else used
            case "metered":
                return None  # the check box says it
            case "cap":
                return format_bytes(cap["limit_bytes"]) if cap else "No cap"
            case "period":
                return _label(PERIODS, cap.get("period")) if cap else ""
            case "reset_day":
                return str(cap.get("reset_day", 1)) if cap else ""
            case "then":
                return _label(AT_CAP, cap.get("then")) if cap else ""
        return None

    def _edit_value(self, row: dict[str, Any], key: str) -> Any:
        cap = row.get("cap") or {}
        match key:
            case "priority":
                return row.get("priority")
            case "cap":
                return format_bytes(cap["limit_bytes"]) if cap else ""
            case "period":
                return cap.get("period", "month")
            case "reset_day":
                return int(cap.get("reset_day", 1))
            case "then":
                return cap.get("then", "never")
        return self._display(row, key)

    def _state_colour(self, row: dict[str, Any]) -> str:
        if row.get("state") != "up":
            return "#9a9996"
        if row.get("connectivity") == "portal":
            return "#ff7800"  # waiting for the user, not failed
        if row.get("alive") is False:
            return "#e01b24"
        if row.get("carrying") is False and row.get("effective_priority") != "never":
            return "#ff7800"
        return "#26a269"

    def _tooltip(self, row: dict[str, Any], key: str) -> str | None:
        if key == "link":
            addresses = ", ".join(row.get("addresses") or []) or "no address"
            return (
                f"{row.get('name')} ({KIND_LABELS.get(str(row.get('kind')), 'Other')}): {addresses}"
            )
        if key == "state":
            if row.get("state") == "up" and row.get("connectivity") == "portal":
                return (
                    "A captive portal holds this link (NetworkManager's connectivity check): "
                    "open any web page on this network to sign in. Braid uses it again then."
                )
            parts = [f"interface {row.get('state')}"]
            alive = row.get("alive")
            parts.append(
                {True: "answers probes", False: "not answering", None: "not probed"}[alive]
            )
            parts.append(f"{row.get('subflows', 0)} subflows")
            return ", ".join(parts)
        return self.columns[self.column_of(key)].tip or None

    # -- editing ----------------------------------------------------------------

    def flags(self, index: Index) -> Qt.ItemFlag:
        if not index.isValid():
            # Dropping between rows (not onto one) is how a drag reorders.
            return Qt.ItemFlag.ItemIsDropEnabled if self.editable else Qt.ItemFlag.NoItemFlags
        flags = (
            Qt.ItemFlag.ItemIsEnabled
            | Qt.ItemFlag.ItemIsSelectable
            | Qt.ItemFlag.ItemNeverHasChildren
        )
        if not self.editable:
            return flags
        flags |= Qt.ItemFlag.ItemIsDragEnabled
        key = self.columns[index.column()].key
        row = self._rows[index.row()]
        if key in _CAP_FIELDS and not row.get("cap"):
            return flags & ~Qt.ItemFlag.ItemIsEnabled  # no cap: nothing to say about its period
        if key == "metered":
            flags |= Qt.ItemFlag.ItemIsUserCheckable
        elif key in _EDITABLE:
            flags |= Qt.ItemFlag.ItemIsEditable
        return flags

    def setData(self, index: Index, value: Any, role: int = Qt.ItemDataRole.EditRole) -> bool:
        if not self.editable or not index.isValid() or index.row() >= len(self._rows):
            return False
        key = self.columns[index.column()].key
        row = self._rows[index.row()]
        try:
            changed = self._apply(row, key, value, role)
        except ValueError as exc:
            self.invalid.emit(str(exc))
            return False
        if changed:
            self._shown[index.row()] = self._render(row)
            self.dataChanged.emit(
                self.index(index.row(), 0), self.index(index.row(), len(self.columns) - 1)
            )
        return changed

    def _apply(self, row: dict[str, Any], key: str, value: Any, role: int) -> bool:
        if key == "metered" and role == Qt.ItemDataRole.CheckStateRole:
            checked = Qt.CheckState(value) == Qt.CheckState.Checked
            row["metered"] = checked
            return True
        if role != Qt.ItemDataRole.EditRole:
            return False
        if key == "priority":
            if value not in {v for v, _ in PRIORITIES}:
                raise ValueError(f"a priority is always, backup or never (not {value!r})")
            row["priority"] = value
            return True
        if key == "cap":
            limit = parse_size(str(value or ""))
            if limit is None:
                row["cap"] = None
            else:
                row["cap"] = {**(row.get("cap") or DEFAULT_CAP), "limit_bytes": limit}
            return True
        cap = row.get("cap")
        if not cap:
            return False
        if key == "period" and value in {v for v, _ in PERIODS}:
            row["cap"] = {**cap, "period": value}
            return True
        if key == "then" and value in {v for v, _ in AT_CAP}:
            row["cap"] = {**cap, "then": value}
            return True
        if key == "reset_day":
            day = int(value)
            if not 1 <= day <= 28:
                raise ValueError("the reset day is between 1 and 28 (every month has it)")
            row["cap"] = {**cap, "reset_day": day}
            return True
        return False

    # -- reordering ---------------------------------------------------------------

    def supportedDropActions(self) -> Qt.DropAction:
        return Qt.DropAction.MoveAction

    def supportedDragActions(self) -> Qt.DropAction:
        return Qt.DropAction.MoveAction

    def mimeTypes(self) -> list[str]:
        return [MIME_TYPE]

    def mimeData(self, indexes: list[QModelIndex]) -> QMimeData:
        rows = sorted({index.row() for index in indexes if index.isValid()})
        data = QMimeData()
        names = [self._rows[row]["name"] for row in rows if row < len(self._rows)]
        data.setData(MIME_TYPE, QByteArray(json.dumps(names).encode()))
        return data

    def canDropMimeData(
        self, data: QMimeData, action: Qt.DropAction, row: int, column: int, parent: Index
    ) -> bool:
        return self.editable and action == Qt.DropAction.MoveAction and data.hasFormat(MIME_TYPE)

    def dropMimeData(
        self, data: QMimeData, action: Qt.DropAction, row: int, column: int, parent: Index
    ) -> bool:
        if action == Qt.DropAction.IgnoreAction:
            return True
        if not self.canDropMimeData(data, action, row, column, parent):
            return False
        try:
            names = json.loads(bytes(data.data(MIME_TYPE).data()).decode())
        except ValueError:
            return False
        if parent.isValid():  # dropped onto a row: put them before it
            row = parent.row()
        if row < 0 or row > len(self._rows):
            row = len(self._rows)
        moved = False
        for name in names:
            current = self.names().index(name) if name in self.names() else -1
            if current < 0:
                continue
            if self.moveRows(QModelIndex(), current, 1, QModelIndex(), row):
                moved = True
            new_position = self.names().index(name)
            row = new_position + 1  # the next dragged link goes after this one
        return moved

    def moveRows(
        self,
        source_parent: Index,
        source_row: int,
        count: int,
        destination_parent: Index,
        destination_child: int,
    ) -> bool:
        if source_parent.isValid() or destination_parent.isValid() or count < 1:
            return False
        if source_row < 0 or source_row + count > len(self._rows):
            return False
        if not 0 <= destination_child <= len(self._rows):
            return False
        if source_row <= destination_child <= source_row + count:
            return False  # onto itself: Qt forbids announcing such a move
        if not self.beginMoveRows(
            QModelIndex(), source_row, source_row + count - 1, QModelIndex(), destination_child
        ):
            return False
        at = destination_child - count if destination_child > source_row else destination_child
        for rows in (self._rows, self._shown):
            block = rows[source_row : source_row + count]
            del rows[source_row : source_row + count]
            rows[at:at] = block
        self.endMoveRows()
        return True

    def move(self, row: int, offset: int) -> bool:
        """Move one link up (-1) or down (+1): the buttons beside the table."""
        target = row + offset
        if not 0 <= row < len(self._rows) or not 0 <= target < len(self._rows):
            return False
        destination = target if offset < 0 else target + 1
        return self.moveRows(QModelIndex(), row, 1, QModelIndex(), destination)


def link_changes(
    before: list[dict[str, Any]], after: list[dict[str, Any]]
) -> tuple[list[tuple[str, dict[str, Any]]], list[str] | None]:
    """What the user changed in the table: set-link arguments per link, and the new order.

    Only fields that differ are sent, so accepting an untouched dialog sends nothing.
    """
    old = {str(link.get("name")): link for link in before}
    changes = []
    for link in after:
        name = str(link.get("name"))
        if name not in old:
            continue
        diff = {
            key: link.get(key)
            for key in ("priority", "metered", "cap")
            if link.get(key) != old[name].get(key)
        }
        if diff:
            changes.append((name, diff))
    order = [str(link.get("name")) for link in after]
    return changes, (order if order != [str(link.get("name")) for link in before] else None)
