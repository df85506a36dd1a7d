"""One colour per link, the same in the graphs, the legend, the table and the tray menu.

Colours come from a fixed palette that reads on light and dark backgrounds; a link keeps
its colour for as long as the tray runs, and across runs when a QSettings is given, so
"the orange line" always means the same phone.
"""

from __future__ import annotations

from PySide6.QtCore import QSettings
from PySide6.QtGui import QColor

# Tableau 10, reordered so that the first three links (a laptop's usual) differ most.
PALETTE: tuple[str, ...] = (
    "#4e79a7",  # blue
    "#f28e2b",  # orange
    "#59a14f",  # green
    "#e15759",  # red
    "#b07aa1",  # purple
    "#76b7b2",  # teal
    "#edc948",  # yellow
    "#ff9da7",  # pink
    "#9c755f",  # brown
    "#bab0ac",  # grey
)


class LinkColours:
    """Hands out palette colours to link names, first come first served, never reused."""

    def __init__(self, store: QSettings | None = None) -> None:
        self._store = store
        self._index: dict[str, int] = {}
        if store is not None:
            store.beginGroup("colours")
            for name in store.childKeys():
                try:
                    self._index[name] = int(store.value(name)) % len(PALETTE)
                except (TypeError, ValueError):
                    continue
            store.endGroup()

    def hex(self, name: str) -> str:
        index = self._index.get(name)
        if index is None:
            used = set(self._index.values())
            free = [i for i in range(len(PALETTE)) if i not in used]
            index = free[0] if free else len(self._index) % len(PALETTE)
            self._index[name] = index
            if self._store is not None:
                self._store.setValue(f"colours/{name}", index)
        return PALETTE[index]

    def colour(self, name: str) -> QColor:
        return QColor(self.hex(name))

    def assign(self, names: list[str]) -> None:
        """Give colours in the daemon's order, so a fresh start colours the best link first."""
        for name in names:
            self.hex(name)
