"""Small helpers around named network namespaces (the ``ip netns`` kind, under /run/netns).

Every command here names its namespace explicitly (``ip -n``, ``tc -n``, ``ip netns exec``): the
test world must never touch the namespace of the machine it runs on, whatever namespace the
calling thread happens to be in.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shlex
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

NETNS_RUN_DIR = Path("/run/netns")
#: ``ip netns exec NAME`` bind-mounts each file of this directory over the one of the same name
#: in /etc (how a namespace gets a hosts file of its own).
NETNS_ETC_DIR = Path("/etc/netns")
CLONE_NEWNET = 0x40000000


class NetbedError(RuntimeError):
    """A command building or changing the test world failed."""


def command(
    argv: Sequence[str], *, check: bool = True, input: str | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run a command (logged at debug level); raise :class:`NetbedError` with its stderr."""
    log.debug("$ %s", shlex.join(argv))
    try:
        result = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetbedError(f"{shlex.join(argv)}: {exc}") from exc
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise NetbedError(f"{shlex.join(argv)} failed ({result.returncode}): {detail}")
    return result


def ip_batch(ns: str, lines: Sequence[str]) -> None:
    """Run ``ip`` commands (one per line, without the leading ``ip``) inside namespace ``ns``."""
    if lines:
        log.debug("ip -n %s -batch:\n  %s", ns, "\n  ".join(lines))
        command(["ip", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n")


def list_netns() -> list[str]:
    try:
        return sorted(entry.name for entry in NETNS_RUN_DIR.iterdir())
    except FileNotFoundError:
        return []


def _netns_inode(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def pids_in_netns(name: str) -> list[int]:
    """Processes whose network namespace is ``name`` (what ``ip netns pids`` does), minus us.

    Our own process is left out: a thread of ours may have entered the namespace
    (:func:`entered`), and killing ourselves is never what teardown means.
    """
    wanted = _netns_inode(NETNS_RUN_DIR / name)
    if wanted is None:
        return []
    me = os.getpid()
    pids = []
    for entry in Path("/proc").iterdir():
        if (
            entry.name.isdigit()
            and int(entry.name) != me
            and _netns_inode(entry / "ns" / "net") == wanted
        ):
            pids.append(int(entry.name))
    return pids


def kill_netns_processes(name: str) -> None:
    """SIGKILL every process left in namespace ``name``."""
    for pid in pids_in_netns(name):
        log.debug("killing pid %d left in %s", pid, name)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def delete_netns(name: str) -> None:
    """Kill what runs in namespace ``name``, delete it and its /etc/netns directory."""
    kill_netns_processes(name)
    if (NETNS_RUN_DIR / name).exists():
        command(["ip", "netns", "delete", name], check=False)
    remove_netns_etc(name)


def remove_netns_etc(name: str) -> None:
    directory = NETNS_ETC_DIR / name
    if directory.is_dir():
        for entry in directory.iterdir():
            entry.unlink()
        directory.rmdir()
        log.debug("removed %s", directory)


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Move the calling *thread* into network namespace ``name`` for the ``with`` block.

    setns(CLONE_NEWNET) changes only the calling thread; sockets made inside the block belong to
    that namespace for their whole life. Threads started inside inherit it. The thread's own
    namespace is restored on exit.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(NETNS_RUN_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)
