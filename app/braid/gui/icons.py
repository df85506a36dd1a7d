"""Braid's icons, drawn with QPainter so the tray never depends on files being installed.

The glyph is three strands merging into one: three links, one connection. The tray state
is told by colour and a badge in the corner (blue dots: connecting, orange !: degraded,
red ×: error), each drawn for light and for dark panels. ``python -m braid.gui.icons DIR``
writes the same drawings as a hicolor theme (PNG per size, SVG scalable) for packaging.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QPointF, QRectF, QSize, Qt
from PySide6.QtGui import (
    QBrush,
    QColor,
    QIcon,
    QImage,
    QLinearGradient,
    QPainter,
    QPainterPath,
    QPen,
    QPixmap,
)

STATES = ("disconnected", "connecting", "connected", "degraded", "error")
KINDS = ("ethernet", "wifi", "cellular", "other")
STATUS_SIZES = (16, 22, 24, 32, 48, 64)
APP_SIZES = (16, 22, 24, 32, 48, 64, 128, 256)

_GREEN = {"light": "#26a269", "dark": "#33d17a"}
# Opaque greys, not alpha: translucent strands would darken where they overlap.
_IDLE = {"light": "#858585", "dark": "#b4b4b4"}
_LOST = {"light": "#c4c4c4", "dark": "#6e6e6e"}
_PANEL = {"light": "#ffffff", "dark": "#2d2d2d"}  # the badge's ring, to part it from the strands
_BADGE = {"connecting": "#3584e4", "degraded": "#ff7800", "error": "#e01b24"}

Painter = Callable[[QPainter], None]


def _strands(painter: QPainter, colours: list[QColor], dashed: int | None = None) -> None:
    """Three strands from the left merging at the right, in a 64×64 box."""
    ends = (14.0, 32.0, 50.0)
    strands = list(enumerate(zip(ends, colours, strict=True)))
    strands.sort(key=lambda item: item[0] != dashed)  # a lost strand goes under the others
    for i, (y, colour) in strands:
        path = QPainterPath(QPointF(7, y))
        path.cubicTo(QPointF(24, y), QPointF(28, 32), QPointF(42, 32))
        pen = QPen(colour, 7.0, Qt.PenStyle.SolidLine, Qt.PenCapStyle.RoundCap)
        if i == dashed:
            pen.setStyle(Qt.PenStyle.CustomDashLine)
            pen.setDashPattern([0.9, 1.2])
        painter.setPen(pen)
        painter.setBrush(Qt.BrushStyle.NoBrush)
        painter.drawPath(path)
    painter.setPen(QPen(colours[1], 7.0, Qt.PenStyle.SolidLine, Qt.PenCapStyle.RoundCap))
    painter.drawLine(QPointF(42, 32), QPointF(57, 32))


def _badge(painter: QPainter, state: str, panel: str) -> None:
    centre = QPointF(47, 47)
    painter.setPen(QPen(QColor(_PANEL[panel]), 4.0))
    painter.setBrush(QColor(_BADGE[state]))
    painter.drawEllipse(centre, 15, 15)
    white = QColor("#ffffff")
    painter.setBrush(white)
    if state == "error":
        painter.setPen(QPen(white, 4.5, Qt.PenStyle.SolidLine, Qt.PenCapStyle.RoundCap))
        painter.drawLine(QPointF(41, 41), QPointF(53, 53))
        painter.drawLine(QPointF(53, 41), QPointF(41, 53))
    elif state == "degraded":
        painter.setPen(QPen(white, 4.5, Qt.PenStyle.SolidLine, Qt.PenCapStyle.RoundCap))
        painter.drawLine(QPointF(47, 39), QPointF(47, 48))
        painter.setPen(Qt.PenStyle.NoPen)
        painter.drawEllipse(QPointF(47, 54), 2.6, 2.6)
    else:  # connecting: three dots, as a spinner at rest
        painter.setPen(Qt.PenStyle.NoPen)
        for x in (40.5, 47.0, 53.5):
            painter.drawEllipse(QPointF(x, 47), 2.6, 2.6)


def status_painter(state: str, panel: str = "light") -> Painter:
    """How to draw the tray icon for ``state`` on a ``panel`` ("light" or "dark")."""
    if state not in STATES:
        raise ValueError(f"unknown tray state {state!r}")

    def paint(painter: QPainter) -> None:
        green = QColor(_GREEN[panel])
        faded = QColor(_IDLE[panel])
        if state == "connected":
            _strands(painter, [green, green, green])
        elif state == "degraded":
            _strands(painter, [green, green, QColor(_LOST[panel])], dashed=2)
            _badge(painter, state, panel)
        else:
            _strands(painter, [faded, faded, faded])
            if state != "disconnected":
                _badge(painter, state, panel)

    return paint


def app_painter(painter: QPainter) -> None:
    """The application icon: the white glyph on a green tile."""
    tile = QLinearGradient(0, 0, 0, 64)
    tile.setColorAt(0, QColor("#2ec27e"))
    tile.setColorAt(1, QColor("#1c7c54"))
    painter.setPen(Qt.PenStyle.NoPen)
    painter.setBrush(QBrush(tile))
    painter.drawRoundedRect(QRectF(3, 3, 58, 58), 13, 13)
    painter.save()
    painter.translate(32, 32)
    painter.scale(0.72, 0.72)
    painter.translate(-32, -32)
    white = QColor("#ffffff")
    _strands(painter, [white, white, white])
    painter.restore()


def kind_painter(kind: str, colour: QColor) -> Painter:
    """A small picture of the link's kind, in the link's own colour."""

    def paint(painter: QPainter) -> None:
        if kind == "ethernet":  # a network socket: body, latch, pins
            painter.setPen(Qt.PenStyle.NoPen)
            painter.setBrush(colour)
            body = QPainterPath()
            body.addRoundedRect(QRectF(8, 12, 48, 34), 5, 5)
            body.addRect(QRectF(22, 44, 20, 10))
            painter.drawPath(body.simplified())
            painter.setPen(QPen(QColor("#ffffff"), 3.0))
            for x in (18, 26, 34, 42):
                painter.drawLine(QPointF(x + 2, 17), QPointF(x + 2, 26))
        elif kind == "wifi":  # a dot and three arcs
            pen = QPen(colour, 7.0, Qt.PenStyle.SolidLine, Qt.PenCapStyle.RoundCap)
            painter.setPen(pen)
            painter.setBrush(Qt.BrushStyle.NoBrush)
            for radius in (13, 27, 41):
                box = QRectF(32 - radius, 54 - radius, 2 * radius, 2 * radius)
                painter.drawArc(box, 45 * 16, 90 * 16)
            painter.setPen(Qt.PenStyle.NoPen)
            painter.setBrush(colour)
            painter.drawEllipse(QPointF(32, 53), 5.5, 5.5)
        elif kind == "cellular":  # signal bars
            painter.setPen(Qt.PenStyle.NoPen)
            painter.setBrush(colour)
            for i, height in enumerate((14, 24, 34, 46)):
                painter.drawRoundedRect(QRectF(7 + i * 13, 56 - height, 10, height), 2.5, 2.5)
        else:  # anything else: a ring
            painter.setPen(QPen(colour, 8.0))
            painter.setBrush(Qt.BrushStyle.NoBrush)
            painter.drawEllipse(QPointF(32, 32), 20, 20)

    return paint


def render(paint: Painter, size: int, scale: float = 1.0) -> QImage:
    """Draw at ``size`` pixels (times ``scale`` for HiDPI) on a transparent image."""
    pixels = round(size * scale)
    image = QImage(pixels, pixels, QImage.Format.Format_ARGB32_Premultiplied)
    image.fill(Qt.GlobalColor.transparent)
    image.setDevicePixelRatio(scale)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    painter.scale(size / 64.0, size / 64.0)
    paint(painter)
    painter.end()
    return image


def make_icon(paint: Painter, sizes: tuple[int, ...] = STATUS_SIZES) -> QIcon:
    icon = QIcon()
    for size in sizes:
        icon.addPixmap(QPixmap.fromImage(render(paint, size)))
        icon.addPixmap(QPixmap.fromImage(render(paint, size, 2.0)))
    return icon


class IconSet:
    """Icons drawn once and kept: the tray swaps between them at every state change."""

    def __init__(self) -> None:
        self._status: dict[tuple[str, str], QIcon] = {}
        self._kinds: dict[tuple[str, str], QIcon] = {}
        self._app: QIcon | None = None

    def status(self, state: str, panel: str = "light") -> QIcon:
        key = (state, panel)
        if key not in self._status:
            self._status[key] = make_icon(status_painter(state, panel))
        return self._status[key]

    def kind(self, kind: str, colour: QColor | str) -> QIcon:
        colour = QColor(colour)
        key = (kind if kind in KINDS else "other", colour.name())
        if key not in self._kinds:
            self._kinds[key] = make_icon(kind_painter(key[0], colour), (16, 22, 32))
        return self._kinds[key]

    def dot(self, colour: QColor | str) -> QIcon:
        """A small filled circle: a link's health in the table."""
        colour = QColor(colour)
        key = ("dot", colour.name())
        if key not in self._kinds:

            def paint(painter: QPainter) -> None:
                painter.setPen(Qt.PenStyle.NoPen)
                painter.setBrush(colour)
                painter.drawEllipse(QPointF(32, 32), 17, 17)

            self._kinds[key] = make_icon(paint, (16, 22, 32))
        return self._kinds[key]

    def app(self) -> QIcon:
        if self._app is None:
            self._app = make_icon(app_painter, APP_SIZES)
        return self._app


def _write_svg(paint: Painter, path: Path) -> None:
    from PySide6.QtSvg import QSvgGenerator  # only the theme writer needs it

    generator = QSvgGenerator()
    generator.setFileName(str(path))
    generator.setSize(QSize(64, 64))
    generator.setViewBox(QRectF(0, 0, 64, 64))
    generator.setTitle("Braid")
    painter = QPainter(generator)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    paint(painter)
    painter.end()


def write_theme(root: Path) -> list[Path]:
    """Write every icon as a hicolor theme under ``root``; returns the files written."""
    written: list[Path] = []
    jobs: list[tuple[str, str, Painter, tuple[int, ...]]] = [
        ("apps", "braid", app_painter, APP_SIZES)
    ]
    for state in STATES:
        for panel in ("light", "dark"):
            name = f"braid-{state}-{panel}-panel"
            jobs.append(("status", name, status_painter(state, panel), STATUS_SIZES))
    for context, name, paint, sizes in jobs:
        for size in sizes:
            folder = root / "hicolor" / f"{size}x{size}" / context
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{name}.png"
            render(paint, size).save(str(path))
            written.append(path)
        folder = root / "hicolor" / "scalable" / context
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.svg"
        _write_svg(paint, path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    from PySide6.QtGui import QGuiApplication

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m braid.gui.icons DIR   (e.g. resources/icons)", file=sys.stderr)
        return 2
    app = QGuiApplication.instance() or QGuiApplication(["braid-icons"])
    written = write_theme(Path(args[0]))
    print(f"wrote {len(written)} icons under {args[0]}")
    del app
    return 0


if __name__ == "__main__":
    sys.exit(main())
