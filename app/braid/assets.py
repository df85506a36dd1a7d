"""Where Braid's resources (icons, desktop entries, unit files) are, frozen or not.

A source checkout keeps them in ``resources/`` next to ``app/``; a PyInstaller bundle
carries them in ``resources/`` under its data directory (``sys._MEIPASS``); the Debian
package also installs the shared ones under ``/usr/share/braid``.
"""

from __future__ import annotations

import sys
from pathlib import Path

SYSTEM_DIR = Path("/usr/share/braid")


def resource_roots() -> list[Path]:
    """The places to look, in order: the bundle's or the checkout's, then the system's."""
    bundle = getattr(sys, "_MEIPASS", None)
    if getattr(sys, "frozen", False) and bundle:
        first = Path(bundle) / "resources"
    else:
        first = Path(__file__).resolve().parents[2] / "resources"
    return [first, SYSTEM_DIR]


def find_asset(*parts: str) -> Path | None:
    """``resources/<parts>`` from the first place that has it, or None."""
    for root in resource_roots():
        path = root.joinpath(*parts)
        if path.exists():
            return path
    return None


def get_asset(*parts: str) -> Path:
    """Like :func:`find_asset`, but a missing asset is an error that says where it looked."""
    path = find_asset(*parts)
    if path is None:
        where = ", ".join(str(root) for root in resource_roots())
        raise FileNotFoundError(f"Braid's resource {'/'.join(parts)} is in none of: {where}")
    return path
