"""The dashboard: how the connection is doing, link by link, over the last five minutes."""

from __future__ import annotations

import time

from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QCloseEvent, QColor, QFont, QPalette
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFrame,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSizePolicy,
    QSplitter,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from braid.gui.graphs import RateGraphs
from braid.gui.icons import IconSet
from braid.gui.model import DASHBOARD_COLUMNS, LinkTableModel
from braid.gui.session import LogEntry, Session, TrayState
from braid.units import format_rate

LOG_LINES = 100
LEVEL_COLOURS = {"warning": "#c64600", "error": "#c01c28"}


def panel_for(widget: QWidget) -> str:
    """ "dark" when the widget's background is dark, for icons drawn on it."""
    return (
        "dark" if widget.palette().color(QPalette.ColorRole.Window).lightness() < 128 else "light"
    )


def _mbit(bits_per_second: float) -> str:
    """The legend's numbers share the graphs' unit, so they read against the axis."""
    value = bits_per_second / 1e6
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


class Legend(QWidget):
    """A swatch, the name and the current rates of every link, and the total."""

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self._layout = QHBoxLayout(self)
        self._layout.setContentsMargins(4, 0, 4, 0)
        self._layout.setSpacing(18)
        self._labels: dict[str, QLabel] = {}
        self._names: list[str] = []

    def refresh(self) -> None:
        history = self.session.history
        names = [n for n in (link["name"] for link in self.session.links) if n] or history.names()
        if names != self._names:
            self._rebuild(names)
        for name, label in self._labels.items():
            rx, tx = history.latest(name, "rx"), history.latest(name, "tx")
            if name == "":
                rx, tx = self.session.total_rates()
            label.setText(f"{name or 'Total'}  ↓ {_mbit(rx)}  ↑ {_mbit(tx)} Mbit/s")

    def _rebuild(self, names: list[str]) -> None:
        while self._layout.count():
            item = self._layout.takeAt(0)
            if item.widget():
                item.widget().deleteLater()
        self._labels = {}
        self._names = names
        text = self.palette().color(QPalette.ColorRole.Text).name()
        for name in [*names, ""]:
            colour = self.session.colours.hex(name) if name else text
            swatch = QFrame()
            swatch.setFixedSize(QSize(14, 4 if name else 3))
            swatch.setStyleSheet(f"background: {colour}; border-radius: 1px;")
            label = QLabel()
            if not name:
                font = label.font()
                font.setBold(True)
                label.setFont(font)
            sample = f"{name or 'Total'}  ↓ 888.8  ↑ 888.8 Mbit/s"
            label.setFixedWidth(label.fontMetrics().horizontalAdvance(sample) + 4)
            pair = QHBoxLayout()
            pair.setSpacing(6)
            pair.addWidget(swatch, 0, Qt.AlignmentFlag.AlignVCenter)
            pair.addWidget(label)
            self._layout.addLayout(pair)
            self._labels[name] = label
        self._layout.addStretch(1)


class Dashboard(QWidget):
    """The main window: status line, graphs with legend, the links, and what happened."""

    settings_requested = Signal()
    diagnose_requested = Signal()
    closed = Signal()

    def __init__(self, session: Session, icons: IconSet, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.icons = icons
        self._shown_look: tuple[str, str] = ("", "")
        self.setWindowTitle("Braid")
        self.setWindowIcon(icons.app())
        self.setMinimumSize(760, 560)
        self.resize(1000, 760)

        outer = QVBoxLayout(self)
        outer.setContentsMargins(16, 14, 16, 14)
        outer.setSpacing(10)
        outer.addLayout(self._build_header())
        # Said when the desktop has no tray: this window is then the only way to Braid.
        self.notice = QLabel()
        self.notice.setWordWrap(True)
        self.notice.setStyleSheet(
            "background: #fff4ce; color: #3d3000; border: 1px solid #e0c36b;"
            " border-radius: 4px; padding: 6px 8px;"
        )
        self.notice.hide()
        outer.addWidget(self.notice)
        self.legend = Legend(session)
        outer.addWidget(self.legend)

        self.graphs = RateGraphs(session.history, session.colours)
        self.graphs.redrawn.connect(self._tick)

        self.model = LinkTableModel(session.colours, icons, DASHBOARD_COLUMNS, parent=self)
        self.table = QTableView()
        self.table.setModel(self.model)
        self.table.verticalHeader().hide()
        self.table.setAlternatingRowColors(True)
        self.table.setShowGrid(False)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setIconSize(QSize(16, 16))
        self.table.setWordWrap(False)
        header = self.table.horizontalHeader()
        # Sized to contents when the links change, not at every sample: measuring every
        # cell each second would cost more than drawing the graphs.
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        header.setStretchLastSection(True)
        self.model.modelReset.connect(self._fit_columns)
        header.setDefaultAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter)

        self.events = QListWidget()
        self.events.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.events.setWordWrap(True)
        self.events.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        self.events.setIconSize(QSize(14, 14))

        bottom = QSplitter(Qt.Orientation.Horizontal)
        bottom.addWidget(self._titled("Links", self.table))
        bottom.addWidget(self._titled("Events", self.events))
        bottom.setStretchFactor(0, 3)
        bottom.setStretchFactor(1, 2)
        bottom.setSizes([640, 340])
        bottom.setChildrenCollapsible(False)

        middle = QSplitter(Qt.Orientation.Vertical)
        middle.addWidget(self.graphs)
        middle.addWidget(bottom)
        middle.setStretchFactor(0, 3)
        middle.setStretchFactor(1, 2)
        middle.setChildrenCollapsible(False)
        middle.setSizes([440, 250])
        outer.addWidget(middle, 1)

        for entry in session.log:
            self._add_event(entry)
        session.changed.connect(self._on_changed)
        session.logged.connect(self._add_event)
        self._on_changed()

    # -- building -----------------------------------------------------------------

    def _build_header(self) -> QHBoxLayout:
        row = QHBoxLayout()
        row.setSpacing(12)
        self.state_icon = QLabel()
        self.state_icon.setFixedSize(48, 48)
        row.addWidget(self.state_icon, 0, Qt.AlignmentFlag.AlignTop)
        texts = QVBoxLayout()
        texts.setSpacing(2)
        self.headline = QLabel()
        font = self.headline.font()
        font.setPointSizeF(font.pointSizeF() * 1.35)
        font.setWeight(QFont.Weight.DemiBold)
        self.headline.setFont(font)
        self.headline.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.details = QLabel()
        self.details.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        for label in (self.headline, self.details):
            # Texts that change every second must not re-lay the window out every second.
            label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        muted = self.details.palette()
        muted.setColor(
            QPalette.ColorRole.WindowText, muted.color(QPalette.ColorRole.PlaceholderText)
        )
        self.details.setPalette(muted)
        texts.addWidget(self.headline)
        texts.addWidget(self.details)
        row.addLayout(texts, 1)
        self.toggle_button = QPushButton("Connect")
        self.toggle_button.setMinimumWidth(110)
        self.toggle_button.clicked.connect(self.session.toggle)
        self.diagnose_button = QPushButton("Diagnose…")
        self.diagnose_button.setToolTip(
            "Ask braidd to check every link: why is Braid not using all of them?"
        )
        self.diagnose_button.clicked.connect(self.diagnose_requested)
        self.settings_button = QPushButton("Settings…")
        self.settings_button.clicked.connect(self.settings_requested)
        for button in (self.toggle_button, self.diagnose_button, self.settings_button):
            button.setSizePolicy(QSizePolicy.Policy.Fixed, QSizePolicy.Policy.Fixed)
            row.addWidget(button, 0, Qt.AlignmentFlag.AlignVCenter)
        return row

    def _titled(self, title: str, widget: QWidget) -> QWidget:
        box = QWidget()
        layout = QVBoxLayout(box)
        layout.setContentsMargins(0, 6, 0, 0)
        layout.setSpacing(4)
        label = QLabel(f"<b>{title}</b>")
        layout.addWidget(label)
        layout.addWidget(widget, 1)
        return box

    def _fit_columns(self) -> None:
        self.table.resizeColumnsToContents()
        wide = self.table.fontMetrics().horizontalAdvance("888.8 Mbit/s") + 16
        for key in ("rx", "tx"):
            column = self.model.column_of(key)
            self.table.setColumnWidth(column, max(wide, self.table.columnWidth(column)))

    # -- following the session ------------------------------------------------------

    def _on_changed(self) -> None:
        session = self.session
        self.model.set_links(session.links)
        look = (str(session.state), panel_for(self))
        if look != self._shown_look:  # a new picture only when the state changes
            self._shown_look = look
            self.state_icon.setPixmap(self.icons.status(*look).pixmap(48, 48))
        self.toggle_button.setText("Disconnect" if session.tunnel_up else "Connect")
        self.toggle_button.setEnabled(session.client.is_connected)
        self._tick()

    def _tick(self) -> None:
        """Texts that age by the second (durations, rates): refreshed with the graphs."""
        session = self.session
        self.headline.setText(session.headline())
        self.details.setText(self._details())
        if self.isVisible():
            self.legend.refresh()

    def _details(self) -> str:
        session = self.session
        status = session.status
        parts = []
        if session.state in (TrayState.CONNECTED, TrayState.DEGRADED):
            rx, tx = session.total_rates()
            parts.append(f"Total ↓ {format_rate(rx)}  ↑ {format_rate(tx)}")
            if status.get("best_link"):
                parts.append(f"new connections start on {status['best_link']}")
        elif session.state == TrayState.ERROR and session.status.get("error"):
            parts.append(str(status["error"]))
        if status.get("socks"):
            parts.append(f"SOCKS5 proxy {status['socks']}")
        problems = status.get("problems") or []
        if problems:
            parts.append(f"{len(problems)} problem(s): {problems[0]}")
        if session.state != TrayState.ERROR and session.problem:
            parts.append(session.problem)
        return " · ".join(parts)

    def _add_event(self, entry: LogEntry) -> None:
        when = time.strftime("%H:%M:%S", time.localtime(entry.t))
        item = QListWidgetItem(f"{when}   {entry.message}")
        if entry.level in LEVEL_COLOURS:
            item.setForeground(QColor(LEVEL_COLOURS[entry.level]))
        # Link events carry the link's icon, the rest Braid's: the times stay aligned.
        item.setIcon(self._event_icon(entry.link) if entry.link else self.icons.app())
        self.events.insertItem(0, item)  # newest on top
        while self.events.count() > LOG_LINES:
            self.events.takeItem(self.events.count() - 1)

    def _event_icon(self, name: str):
        kind = next(
            (str(link.get("kind")) for link in self.session.links if link.get("name") == name),
            "other",
        )
        return self.icons.kind(kind, self.session.colours.colour(name))

    def set_notice(self, text: str) -> None:
        self.notice.setText(text)
        self.notice.setVisible(bool(text))

    # -- window ---------------------------------------------------------------------

    def toggle_visible(self) -> None:
        if self.isVisible() and not self.isMinimized():
            self.hide()
        else:
            self.present()

    def present(self) -> None:
        self.showNormal()
        self.raise_()
        self.activateWindow()

    def showEvent(self, event) -> None:
        super().showEvent(event)
        self.legend.refresh()

    def closeEvent(self, event: QCloseEvent) -> None:
        event.accept()  # hidden, not destroyed: the tray keeps running and can show it again
        self.closed.emit()
