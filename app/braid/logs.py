"""Logging for braidd and braid-server: the journal's way under systemd, timestamps otherwise.

Under systemd (StandardOutput/StandardError=journal) journald stamps every line itself and
reads a `<N>` prefix at the start of each line as its syslog priority (sd-daemon(3)), so
`journalctl -u braidd -p warning` can pick out the warnings. Anywhere else a line carries its
own time and level.
"""

from __future__ import annotations

import logging
import os
import sys

# sd-daemon(3): SD_CRIT 2, SD_ERR 3, SD_WARNING 4, SD_INFO 6, SD_DEBUG 7.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def journal_priority(levelno: int) -> int:
    """The syslog priority journald files a record of this logging level under."""
    for level, priority in _PRIORITIES:
        if levelno >= level:
            return priority
    return 7


class JournalFormatter(logging.Formatter):
    """No timestamp, and every line (a traceback's too) prefixed with its priority."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{journal_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def stderr_is_journal(environ: dict[str, str] | None = None, stream=None) -> bool:
    """True when stderr is the journal stream systemd connected (JOURNAL_STREAM=dev:inode).

    Compared with stderr itself, as systemd.exec(5) advises: a child whose stderr was
    redirected inherits the variable but not the journal.
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat((sys.stderr if stream is None else stream).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def setup(verbose: bool, with_names: bool = True) -> None:
    """Log to stderr at INFO (DEBUG with verbose) for Braid's own loggers, INFO for libraries."""
    names = "%(name)s: " if with_names else ""
    if stderr_is_journal():
        formatter: logging.Formatter = JournalFormatter(f"%(levelname)s {names}%(message)s")
    else:
        formatter = logging.Formatter(f"%(asctime)s %(levelname)s {names}%(message)s")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    # -v is for our own debug lines; libraries (pyroute2 resets its own logger's level on
    # import) stay at INFO and above.
    handler.addFilter(lambda r: r.levelno >= logging.INFO or r.name.startswith("braid"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    logging.getLogger("pyroute2").setLevel(logging.WARNING)


def reason(exc: BaseException) -> str:
    """Why something failed, in words, also for exceptions whose str() is empty."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return "no answer in time"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__
