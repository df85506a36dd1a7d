"""The tray application: tray icon, dashboard, settings dialog (the only Qt code in Braid)."""

from __future__ import annotations

import ctypes
import sys


def _keep_none_alive() -> None:
    """Make None's reference count unreachable for extensions that drop references to it.

    PySide6 6.12.0 on Python 3.11 takes one reference to None away at every call of a
    method that returns nothing (setPen, setText, ...): None starts with a few thousand,
    so a tray that redraws every second aborts within minutes ("none_dealloc"). From
    Python 3.12 None is immortal and this is not needed.
    """
    if sys.version_info >= (3, 12) or sys.implementation.name != "cpython":
        return
    refcount = ctypes.c_ssize_t.from_address(id(None))  # ob_refcnt is PyObject's first field
    if refcount.value < 1 << 40:
        refcount.value += 1 << 40


_keep_none_alive()
