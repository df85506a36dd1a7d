"""Keeping a long-running process's memory flat: hand freed heap back to the system.

glibc's malloc keeps memory a process has freed for reuse: after hours of connections coming and
going, of netlink dumps and TLS handshakes, the resident size of braidd creeps up although the
Python heap does not grow (tracemalloc shows it flat). ``malloc_trim(0)`` returns the free pages,
including those in the middle of the heap, to the kernel. It costs about a millisecond on a heap
of tens of megabytes, so running it once a minute is free. On other C libraries (musl) it is a
no-op.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

TRIM_EVERY = 60.0


def _load_trim() -> Callable[[], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


_trim = _load_trim()


def trim() -> bool:
    """Give freed heap memory back to the system now; True when the C library can."""
    if _trim is None:
        return False
    _trim()
    return True


async def trim_periodically(every: float = TRIM_EVERY) -> None:
    """Run :func:`trim` every ``every`` seconds until cancelled."""
    if _trim is None:
        log.debug("malloc_trim is not available: memory is left to the C library")
        return
    while True:
        await asyncio.sleep(every)
        trim()
