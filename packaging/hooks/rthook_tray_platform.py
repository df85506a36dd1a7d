"""Runtime hook (tray): use a windowing plugin the bundle has.

The tray's bundle carries Qt's xcb plugin and not Wayland's: in a Wayland session the tray
runs through XWayland (its icon goes over D-Bus either way). Without this, Qt would first
look for "wayland" and warn, and a QT_QPA_PLATFORM=wayland in the session would stop it.
"""

import os

_BUNDLED = {"xcb", "offscreen", "minimal"}
_wanted = [name.split(":")[0] for name in os.environ.get("QT_QPA_PLATFORM", "").split(";")]
if not _BUNDLED.intersection(_wanted):
    os.environ["QT_QPA_PLATFORM"] = "xcb"
