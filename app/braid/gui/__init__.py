"""The tray application: tray icon, dashboard, settings dialog (the only Qt code in Braid)."""

from __future__ import annotations

import ctypes
import sys

# Objects that Python 3.12 made immortal (PEP 683): code built for 3.12 may stop counting
# its references to them.
_IMMORTAL_IN_312 = (None, True, False, Ellipsis, NotImplemented, (), "", b"", *range(-5, 257))


def _keep_immortals_alive() -> None:
    """Give the objects that are immortal from Python 3.12 a reference count nothing exhausts.

    PySide6 6.12.0 on Python 3.11 takes a reference to None away at every call of a method
    that returns nothing (setPen, setText, ...) and to True at every bool signal; None
    starts with a few thousand, so a tray that redraws every second would abort within
    minutes ("none_dealloc", "bool_dealloc"). From Python 3.12 this is not needed.
    """
    if sys.version_info >= (3, 12) or sys.implementation.name != "cpython":
        return
    for obj in _IMMORTAL_IN_312:
        refcount = ctypes.c_ssize_t.from_address(id(obj))  # ob_refcnt: PyObject's first field
        if refcount.value < 1 << 40:
            refcount.value += 1 << 40


_keep_immortals_alive()
