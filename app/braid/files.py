"""Files Braid keeps: written aside and renamed, read back with their format version checked.

A full disk or a crash mid-write leaves the old file or the new one, never half of one; a file
that cannot be read is moved aside and reported, never silently replaced by defaults.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        # Keep the owner: root rewriting a service user's files must not lock it out.
        with contextlib.suppress(FileNotFoundError, PermissionError):
            st = os.stat(path)
            if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                os.fchown(fd, st.st_uid, st.st_gid)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: Path, data: Any, mode: int = 0o600) -> None:
    write_atomic(path, json.dumps(data, indent=2).encode(), mode)


def load_json(text: str | bytes) -> Any:
    """``json.loads``, with JSON nested too deeply for the parser a ValueError like any other
    malformed JSON (json raises RecursionError for arrays nested thousands deep)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def object_field(data: dict | None, key: str, path: Path, problems: list[str]) -> dict:
    """``data[key]`` when it is a JSON object; else an empty one, and a problem if it was there."""
    value = (data or {}).get(key) or {}
    if not isinstance(value, dict):
        problems.append(f"{path}: {key} ignored: not a JSON object")
        return {}
    return value


def read_versioned_json(path: Path, version: int, problems: list[str]) -> dict | None:
    """The file's object if its ``version`` is ``version``; None if absent or unreadable.

    An unreadable file (corrupt, or written by a newer Braid) is kept aside as
    ``<name>.unreadable-<time>`` and a sentence saying so is appended to ``problems``.
    """
    try:
        data = load_json(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("version") != version:
            raise ValueError(f"format version {data.get('version')!r}, this Braid reads {version}")
        return data
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
        with contextlib.suppress(OSError):
            os.replace(path, aside)
        message = (
            f"{path} could not be read ({exc}); it was kept as {aside.name} and defaults are used"
        )
        log.error("%s", message)
        problems.append(message)
        return None
