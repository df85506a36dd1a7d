"""Start at login: an XDG autostart entry that every freedesktop session honours."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import sys
from pathlib import Path

ENTRY = "braid-tray.desktop"


def autostart_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "autostart" / ENTRY


def tray_command() -> str:
    """The installed ``braid-tray`` where there is one, else this interpreter running the module."""
    installed = shutil.which("braid-tray")
    if installed:
        return shlex.quote(installed)
    return f"{shlex.quote(sys.executable)} -m braid.gui.app"


def desktop_entry(command: str) -> str:
    return (
        "[Desktop Entry]\n"
        "Type=Application\n"
        "Name=Braid\n"
        "Comment=Bond your Ethernet, Wi-Fi and phone into one connection\n"
        f"Exec={command}\n"
        "Icon=braid\n"
        "Terminal=false\n"
        "Categories=Network;\n"
        "X-GNOME-Autostart-enabled=true\n"
        "X-GNOME-Autostart-Delay=3\n"  # let the panel (and its tray) come up first
    )


def is_enabled() -> bool:
    return autostart_path().is_file()


def set_enabled(enabled: bool) -> Path:
    """Write or remove the entry; returns its path."""
    path = autostart_path()
    if enabled:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(desktop_entry(tray_command()))
        os.replace(tmp, path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return path
