"""Diagnose: the tray's ``braid doctor``: braidd checks every link, the window says what it found.

The request goes out and the window stays live while braidd works (a few seconds): a busy
bar, then one line per link with its verdict, and the whole report as ``braid doctor``
prints it (braid.cli_doctor.render), which Copy puts on the clipboard for a bug report.

"Measure speed" is ``braid doctor --speed``: each link's download and upload, then all links
bonded, within 30 s, the bar following braidd's progress messages step by step.
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

from braid.cli_doctor import LINK_VERDICTS, WAIT, progress_text, render, render_speed, speed_line
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
        self.speed = QPushButton("Measure speed")
        self.speed.setToolTip(
            "Each link's download and upload to your server, then all links bonded: at most "
            "30 s, and about 3 s of each link's full rate each way (metered links too)"
        )
        self.copy = QPushButton("Copy report")
        buttons.addButton(self.again, QDialogButtonBox.ButtonRole.ActionRole)
        buttons.addButton(self.speed, QDialogButtonBox.ButtonRole.ActionRole)
        buttons.addButton(self.copy, QDialogButtonBox.ButtonRole.ActionRole)
        buttons.rejected.connect(self.reject)
        self.again.clicked.connect(self.run)
        self.speed.clicked.connect(self.measure)
        self.copy.clicked.connect(self._copy)
        layout.addWidget(buttons)

        self._timeout = QTimer(self)
        self._timeout.setSingleShot(True)
        self._timeout.timeout.connect(self._timed_out)
        session.client.reply.connect(self._on_reply)
        session.client.progress.connect(self._on_progress)
        self._kind = "doctor"  # or "speed": what the pending request is
        self.speed_result: dict | None = None

    @property
    def running(self) -> bool:
        return self._request is not None

    def run(self) -> None:
        """Ask braidd; the answer comes as a reply signal, the window stays usable meanwhile."""
        self.report = None
        self._busy(
            "doctor",
            "Checking each link: TCP and UDP to the server, MPTCP through the path, the round "
            "trip, the reverse-path filter… (a few seconds)",
        )
        self._request = self.session.client.doctor()
        self._timeout.start(int(self.wait * 1000))

    def measure(self) -> None:
        """Ask braidd for a speed test; progress messages move the bar until the answer."""
        if self.running:
            return
        self.speed_result = None
        self._busy(
            "speed",
            "Measuring each link's download and upload, then all links bonded (at most 30 s)…",
        )
        self._request = self.session.client.speed_test()
        # Progress comes twice a second: this long without any means braidd is stuck.
        self._timeout.start(int(self.wait * 1000))

    def _busy(self, kind: str, text: str) -> None:
        self._kind = kind
        self.links.clear()
        self.details.clear()
        self.status.setText(text)
        self.progress.setRange(0, 0)
        self.progress.show()
        self.again.setEnabled(False)
        self.speed.setEnabled(False)
        self.copy.setEnabled(False)

    def _on_progress(self, request_id: int, news: dict) -> None:
        if request_id != self._request:
            return
        steps, step = int(news.get("steps") or 0), int(news.get("step") or 0)
        if steps:
            self.progress.setRange(0, steps)
            self.progress.setValue(max(0, step - 1))
        self.status.setText(progress_text(news))
        self._timeout.start(int(self.wait * 1000))

    def _on_reply(self, request_id: int, ok: bool, result: object) -> None:
        if request_id != self._request:
            return
        self._finish()
        if not ok:
            message = result.get("message", "") if isinstance(result, dict) else str(result)
            what = "measure the links" if self._kind == "speed" else "run its checks"
            self._failed(f"braidd could not {what}: {message}")
            return
        assert isinstance(result, dict)
        if self._kind == "speed":
            self.show_speed(result)
        else:
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
        self.speed.setEnabled(True)

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

    def show_speed(self, result: dict) -> None:
        self.speed_result = result
        bonded = result.get("bonded") or {}
        headline = speed_line({**bonded, "name": "all links bonded"})
        self.status.setText(f"<b>Speed measured</b> — {headline}")
        for link in result.get("links") or []:
            item = QListWidgetItem(speed_line(link))
            level = "warning" if link.get("error") or link.get("skipped") else "ok"
            item.setForeground(QColor(LEVEL_COLOURS[level]))
            self.links.addItem(item)
        self.details.setPlainText(render_speed(result))
        self.copy.setEnabled(True)

    def _copy(self) -> None:
        QGuiApplication.clipboard().setText(self.details.toPlainText())

    def done(self, result: int) -> None:
        if self.running and self._kind == "speed":
            # braidd goes on measuring (the tray's connection stays open): the figures are
            # shown when they come, and the window shows them (or the bar) when opened again.
            super().done(result)
            return
        self._timeout.stop()
        self._request = None  # a late answer finds no one waiting for it
        super().done(result)
