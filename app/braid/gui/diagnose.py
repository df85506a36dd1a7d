"""Diagnose: the tray's ``braid doctor``: braidd checks every link, the window says what it found.

The request goes out and the window stays live while braidd works (a few seconds): a busy
bar, then one line per link with its verdict, and the whole report as ``braid doctor``
prints it (braid.cli_doctor.render), which Copy puts on the clipboard for a bug report.
"""

from __future__ import annotations

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QColor, QFontDatabase, QGuiApplication
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from braid.cli_doctor import LINK_VERDICTS, WAIT, render
from braid.gui.session import Session

LEVEL_COLOURS = {"ok": "#26a269", "warning": "#c64600", "error": "#c01c28"}
LEVEL_MARKS = {"ok": "✔", "warning": "!", "error": "✖"}
HEADLINES = {"ok": "Nothing wrong found", "warning": "Warnings found", "error": "Problems found"}


class DiagnoseDialog(QDialog):
    """Runs braidd's ``doctor`` without blocking, and shows its answer."""

    def __init__(self, session: Session, parent: QWidget | None = None, wait: float = WAIT) -> None:
        super().__init__(parent)
        self.session = session
        self.wait = wait
        self.report: dict | None = None
        self._request: int | None = None
        self.setWindowTitle("Braid — Diagnose")
        self.resize(820, 600)

        layout = QVBoxLayout(self)
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.progress = QProgressBar()
        self.progress.setRange(0, 0)  # busy: braidd does not say how far it is
        self.progress.setTextVisible(False)
        self.links = QListWidget()
        self.links.setSelectionMode(QListWidget.SelectionMode.NoSelection)
        self.links.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        self.links.setMaximumHeight(130)
        self.details = QPlainTextEdit()
        self.details.setReadOnly(True)
        self.details.setLineWrapMode(QPlainTextEdit.LineWrapMode.WidgetWidth)
        self.details.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        layout.addWidget(self.status)
        layout.addWidget(self.progress)
        layout.addWidget(QLabel("<b>Links</b>"))
        layout.addWidget(self.links)
        layout.addWidget(QLabel("<b>Everything braidd checked</b>"))
        layout.addWidget(self.details, 1)

        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        self.again = QPushButton("Check again")
        self.copy = QPushButton("Copy report")
        buttons.addButton(self.again, QDialogButtonBox.ButtonRole.ActionRole)
        buttons.addButton(self.copy, QDialogButtonBox.ButtonRole.ActionRole)
        buttons.rejected.connect(self.reject)
        self.again.clicked.connect(self.run)
        self.copy.clicked.connect(self._copy)
        layout.addWidget(buttons)

        self._timeout = QTimer(self)
        self._timeout.setSingleShot(True)
        self._timeout.timeout.connect(self._timed_out)
        session.client.reply.connect(self._on_reply)

    @property
    def running(self) -> bool:
        return self._request is not None

    def run(self) -> None:
        """Ask braidd; the answer comes as a reply signal, the window stays usable meanwhile."""
        self.report = None
        self.links.clear()
        self.details.clear()
        self.status.setText(
            "Checking each link: TCP and UDP to the server, MPTCP through the path, the round "
            "trip, the reverse-path filter… (a few seconds)"
        )
        self.progress.show()
        self.again.setEnabled(False)
        self.copy.setEnabled(False)
        self._request = self.session.client.doctor()
        self._timeout.start(int(self.wait * 1000))

    def _on_reply(self, request_id: int, ok: bool, result: object) -> None:
        if request_id != self._request:
            return
        self._finish()
        if not ok:
            message = result.get("message", "") if isinstance(result, dict) else str(result)
            self._failed(f"braidd could not run its checks: {message}")
            return
        assert isinstance(result, dict)
        self.show_report(result)

    def _timed_out(self) -> None:
        self._finish()
        self._failed(
            f"braidd did not answer within {self.wait:.0f} s. It may be busy or hung: "
            "sudo systemctl restart braidd, then check again"
        )

    def _finish(self) -> None:
        self._request = None
        self._timeout.stop()
        self.progress.hide()
        self.again.setEnabled(True)

    def _failed(self, text: str) -> None:
        self.status.setText(f"<span style='color:{LEVEL_COLOURS['error']}'>{text}</span>")

    def show_report(self, report: dict) -> None:
        self.report = report
        level = str(report.get("level", "error"))
        server = report.get("server") or "no server (not paired)"
        self.status.setText(
            f"<b style='color:{LEVEL_COLOURS[level]}'>{LEVEL_MARKS[level]} "
            f"{HEADLINES[level]}</b> — server {server}"
        )
        for link in report.get("links") or []:
            link_level = str(link["level"])
            worst = [f for f in link["findings"] if f["level"] == link_level and link_level != "ok"]
            line = f"{LEVEL_MARKS[link_level]}  {link['name']} ({link['kind']}): "
            line += LINK_VERDICTS[link_level]
            if worst:
                line += f" — {worst[0]['text']}"
            item = QListWidgetItem(line)
            item.setForeground(QColor(LEVEL_COLOURS[link_level]))
            item.setToolTip("\n".join(f["text"] for f in link["findings"]))
            self.links.addItem(item)
        self.details.setPlainText(render(report))
        self.copy.setEnabled(True)

    def _copy(self) -> None:
        QGuiApplication.clipboard().setText(self.details.toPlainText())

    def done(self, result: int) -> None:
        self._timeout.stop()
        self._request = None  # a late answer finds no one waiting for it
        super().done(result)
