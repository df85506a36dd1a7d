"""Live throughput: five minutes of samples per link and in total, drawn once a second.

Samples go into fixed-size numpy ring buffers as they arrive (cheap, from the I/O
callback); the curves are redrawn by one QTimer, only while the graphs are visible and
only when a new sample came, so an idle or hidden dashboard costs nothing.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QTimer, Signal
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

from braid.gui.colours import LinkColours

HISTORY = 300  # samples: five minutes at the daemon's 1 Hz
DIRECTIONS = ("rx", "tx")
MIN_WINDOW = 60  # a fresh start shows the last minute, not a near-empty five
TOTAL = ""  # the key of the total in the buffers (no link can have an empty name)


class RateHistory:
    """Ring buffers of bits per second: per link and total, download (rx) and upload (tx)."""

    def __init__(self, size: int = HISTORY) -> None:
        self.size = size
        self.count = 0  # samples taken so far: the views redraw when it moves
        self._head = 0  # the slot the next sample goes to
        self._buffers: dict[str, np.ndarray] = {TOTAL: self._empty()}  # name → (2, size)
        self._last_seen: dict[str, int] = {}

    def _empty(self) -> np.ndarray:
        return np.full((2, self.size), np.nan)

    def push(self, sample: dict[str, Any]) -> None:
        """Take one sample (the daemon's status shape); links not in it get a gap."""
        links = [link for link in sample.get("links") or [] if isinstance(link, dict)]
        slot = self._head
        for buffer in self._buffers.values():
            buffer[:, slot] = np.nan
        rx_total = tx_total = 0.0
        for link in links:
            name = str(link.get("name", ""))
            if not name:
                continue
            buffer = self._buffers.get(name)
            if buffer is None:
                buffer = self._buffers[name] = self._empty()
            rx, tx = float(link.get("rx_bps") or 0.0), float(link.get("tx_bps") or 0.0)
            buffer[0, slot], buffer[1, slot] = rx, tx
            rx_total += rx
            tx_total += tx
            self._last_seen[name] = self.count
        tunnel = sample.get("tunnel") or {}
        # The tunnel's total counts only links that carry traffic; fall back to the sum.
        self._buffers[TOTAL][0, slot] = float(tunnel.get("rx_bps", rx_total) or 0.0)
        self._buffers[TOTAL][1, slot] = float(tunnel.get("tx_bps", tx_total) or 0.0)
        self._head = (slot + 1) % self.size
        self.count += 1
        for name, seen in list(self._last_seen.items()):
            if self.count - seen > self.size:  # scrolled out of the window: forget it
                del self._last_seen[name]
                del self._buffers[name]

    def names(self) -> list[str]:
        """Links with data in the window, in the order they first appeared."""
        return [name for name in self._buffers if name != TOTAL]

    def series(self, name: str, direction: str = "rx") -> np.ndarray:
        """Oldest first; NaN where there was no sample for this link."""
        row = self._buffers.get(name)
        if row is None:
            return np.full(self.size, np.nan)
        values = row[DIRECTIONS.index(direction)]
        return np.concatenate((values[self._head :], values[: self._head]))

    def latest(self, name: str, direction: str = "rx") -> float:
        if not self.count or name not in self._buffers:
            return 0.0
        value = self._buffers[name][DIRECTIONS.index(direction), (self._head - 1) % self.size]
        return 0.0 if np.isnan(value) else float(value)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per link and total: samples held and peak rates (for the state dump and tests)."""
        out = {}
        for name, buffer in self._buffers.items():
            held = ~np.isnan(buffer[0])
            out[name or "total"] = {
                "samples": int(held.sum()),
                "rx_max_bps": float(np.nanmax(buffer[0])) if held.any() else 0.0,
                "tx_max_bps": float(np.nanmax(buffer[1])) if held.any() else 0.0,
                "rx_nonzero": int((np.nan_to_num(buffer[0]) > 0).sum()),
            }
        return out


def nice_ceiling(value: float) -> float:
    """The next of 1, 2, 5, 10, 20, 50... at or above ``value`` (at least 1)."""
    if value <= 1:
        return 1.0
    scale = 10 ** math.floor(math.log10(value))
    return next(step * scale for step in (1, 2, 5, 10) if step * scale >= value)


class _TimeAxis(pg.AxisItem):
    """Seconds before now, labelled the way people say it: 5 min … now."""

    def tickStrings(self, values, scale, spacing):
        labels = []
        for value in values:
            seconds = round(-value)
            if seconds <= 0:
                labels.append("now")
            elif seconds % 60 == 0:
                labels.append(f"{seconds // 60} min")
            else:
                labels.append(f"{seconds} s")
        return labels

    def tickValues(self, minVal, maxVal, size):
        span = maxVal - minVal
        step = 10 if span <= 75 else 30 if span <= 160 else 60
        return [(float(step), [float(v) for v in range(0, int(minVal) - 1, -step)])]


class RatePlot(pg.PlotWidget):
    """One direction's graph: a line per link, the total on top."""

    def __init__(self, title: str, parent: QWidget | None = None) -> None:
        super().__init__(parent=parent, axisItems={"bottom": _TimeAxis(orientation="bottom")})
        self.title = title
        item = self.getPlotItem()
        item.setMenuEnabled(False)
        item.hideButtons()
        item.setMouseEnabled(x=False, y=False)
        # The grid is a few plain lines, not the axes' own: an axis grid spans the plot, so
        # every curve update would replay the axes (labels included), which costs more
        # than all the curves together.
        self._grid: list[pg.InfiniteLine] = []
        self._grid_pen = pg.mkPen(QColor(128, 128, 128, 40))
        self.curves: dict[str, pg.PlotDataItem] = {}
        self.top = 0.0  # the upper end of the y range now shown
        self.window = 0  # seconds of history on screen: grows to five minutes as data comes
        item.setLimits(yMin=0)
        item.getAxis("left").setWidth(44)
        self.setMinimumHeight(150)
        self.show_window(MIN_WINDOW)
        self.show_top(1.0)

    def show_window(self, seconds: int) -> None:
        if seconds != self.window:
            self.window = seconds
            self.getPlotItem().setXRange(-seconds + 1, 0, padding=0.01)
            self._draw_grid()

    def show_top(self, top: float) -> None:
        """A new y range re-lays the axis out: only when the peak crosses a step."""
        if top != self.top:
            self.top = top
            # A little air above the top tick, or its label is cut by the frame.
            self.getPlotItem().setYRange(0, top * 1.06, padding=0)
            self._draw_grid()

    def _draw_grid(self) -> None:
        item = self.getPlotItem()
        for line in self._grid:
            item.removeItem(line)
        self._grid = []
        bottom = item.getAxis("bottom")
        left = item.getAxis("left")
        verticals = bottom.tickValues(-self.window + 1, 0, 0)[0][1] if self.window else []
        horizontals = (
            left.tickValues(0, self.top, max(left.height(), 100))[0][1] if self.top else []
        )
        for angle, values in ((90, verticals), (0, horizontals)):
            for value in values:
                if value in (0, -self.window + 1):
                    continue
                line = pg.InfiniteLine(value, angle=angle, pen=self._grid_pen, movable=False)
                line.setZValue(-10)
                item.addItem(line, ignoreBounds=True)
                self._grid.append(line)

    def apply_palette(self, palette: QPalette) -> None:
        base = palette.color(QPalette.ColorRole.Base)
        text = palette.color(QPalette.ColorRole.Text)
        self.setBackground(base)
        muted = QColor(text)
        muted.setAlphaF(0.55)
        for side in ("left", "bottom"):
            axis = self.getPlotItem().getAxis(side)
            axis.setPen(pg.mkPen(muted))
            axis.setTextPen(pg.mkPen(muted))

    def curve(self, key: str, colour: QColor, width: float) -> pg.PlotDataItem:
        item = self.curves.get(key)
        if item is None:
            # Data comes finite (see RateGraphs.finite): the fast path, no NaN handling.
            item = self.plot(
                [], [], pen=pg.mkPen(colour, width=width), connect="all", skipFiniteCheck=True
            )
            item.setZValue(10 if key == TOTAL else 1)
            self.curves[key] = item
        return item


class RateGraphs(QWidget):
    """Download above upload, in Mbit/s, redrawn by a single timer while shown."""

    redrawn = Signal()  # after each redraw: the legend and status line refresh with it

    def __init__(
        self,
        history: RateHistory,
        colours: LinkColours,
        parent: QWidget | None = None,
        interval_ms: int = 1000,
    ) -> None:
        super().__init__(parent)
        self.history = history
        self.colours = colours
        self._drawn = -1
        self.x = np.arange(-history.size + 1, 1, dtype=float)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(4)
        self.plots = {"rx": RatePlot("Download"), "tx": RatePlot("Upload")}
        for direction, plot in self.plots.items():
            header = QLabel(f"<b>{plot.title}</b> <span style='color:gray'>Mbit/s</span>")
            header.setContentsMargins(6, 4, 0, 0)
            layout.addWidget(header)
            layout.addWidget(plot, 3 if direction == "rx" else 2)
        self.apply_palette()
        self.timer = QTimer(self)
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self.redraw)
        self.timer.start()

    def apply_palette(self) -> None:
        for plot in self.plots.values():
            plot.apply_palette(self.palette())
        text = self.palette().color(QPalette.ColorRole.Text)
        for plot in self.plots.values():
            if TOTAL in plot.curves:
                plot.curves[TOTAL].setPen(pg.mkPen(text, width=2.2))

    def redraw(self, force: bool = False) -> bool:
        """Refresh the curves from the buffers; False when there was nothing to do."""
        if not force and (self._drawn == self.history.count or not self.isVisible()):
            return False
        self._drawn = self.history.count
        text = self.palette().color(QPalette.ColorRole.Text)
        held = min(self.history.count, self.history.size)
        window = min(self.history.size, max(MIN_WINDOW, -(-held // 30) * 30))
        for direction, plot in self.plots.items():
            plot.show_window(window)
            for name in self.history.names():
                curve = plot.curve(name, self.colours.colour(name), 1.8)
                curve.setData(*self.finite(self.history.series(name, direction)))
            total = plot.curve(TOTAL, text, 2.2)
            total.setData(*self.finite(self.history.series(TOTAL, direction)))
            for name in list(plot.curves):
                if name != TOTAL and name not in self.history.names():
                    plot.removeItem(plot.curves.pop(name))
            peak = max(
                float(np.max(np.nan_to_num(self.history.series(name, direction))))
                for name in [TOTAL, *self.history.names()]
            )
            plot.show_top(nice_ceiling(peak * 1.1 / 1e6))
        self.redrawn.emit()
        return True

    def finite(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """From a link's first sample on, in Mbit/s, gaps as zero: cheap to draw."""
        finite = np.flatnonzero(~np.isnan(values))
        start = int(finite[0]) if len(finite) else len(values)
        return self.x[start:], np.nan_to_num(values[start:]) / 1e6

    def drawn_peaks(self) -> dict[str, dict[str, float]]:
        """The highest value each curve currently shows, in bit/s (what the user sees)."""
        out: dict[str, dict[str, float]] = {}
        for direction, plot in self.plots.items():
            for name, curve in plot.curves.items():
                _, y = curve.getData()
                peak = float(np.max(np.nan_to_num(y))) * 1e6 if y is not None and len(y) else 0.0
                out.setdefault(name or "total", {})[direction] = peak
        return out

    def showEvent(self, event) -> None:
        super().showEvent(event)
        self.redraw(force=True)  # catch up at once after being hidden

    def changeEvent(self, event) -> None:
        super().changeEvent(event)
        if event.type() == event.Type.PaletteChange:
            self.apply_palette()


__all__ = ["HISTORY", "RateGraphs", "RateHistory", "RatePlot"]
