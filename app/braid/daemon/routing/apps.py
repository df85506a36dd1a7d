"""Bypass by application: two cgroups of Braid's own, ``direct`` and ``bonded``.

``braid direct -- CMD`` and ``braid bonded -- CMD`` ask braidd to move the command line's own
process into one of them, then run the command in it; every process it starts stays there. A
socket belongs to the cgroup of the process that made it, and nftables matches that with
``socket cgroupv2``: in system-wide mode the ``direct`` group's traffic returns from every
capture chain and leaves directly; in proxy mode the ``bonded`` group's TCP is redirected to
braidd's transparent listener, as if the program had been set to use the SOCKS5 port.

The groups live in the cgroup v2 hierarchy, at ``<root>/<name>/direct`` and ``…/bonded``
(name ``braid`` unless ``braid daemon --cgroup`` says otherwise). braidd creates them at start
and removes them at stop (a group that still holds a running program stays until it is empty;
``braid daemon --cleanup`` removes empty leftovers). Where braidd sees no cgroup v2 hierarchy
(a hybrid cgroup v1 system mounts it at /sys/fs/cgroup/unified, a network namespace entered with
``ip netns exec`` hides /sys/fs/cgroup) it finds it in /proc/self/mountinfo or mounts one of its
own in its state directory, and unmounts it at stop.

nft looks a cgroup up by path under /sys/fs/cgroup (it stores the cgroup's id, the directory's
inode number); braidd gives it the path relative to that directory, wherever the hierarchy is.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

KINDS = ("direct", "bonded")
#: Where nft resolves ``socket cgroupv2`` paths.
NFT_CGROUP_DIR = Path("/sys/fs/cgroup")
DEFAULT_NAME = "braid"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class AppGroupsError(RuntimeError):
    """The cgroups cannot be made or used; the message says what to do."""


def check_name(name: str) -> str:
    if not _NAME.match(name) or name in (".", ".."):
        raise ValueError(f"{name!r} is not a cgroup name (letters, digits, '.', '_', '-')")
    return name


def cgroup2_mounts(mountinfo: str) -> list[Path]:
    """The mount points of cgroup v2 hierarchies in a /proc/self/mountinfo text."""
    found = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        fstype = line.split(" - ", 1)[1].split()[0]
        if fstype == "cgroup2":
            # The mount point is octal-escaped (a space is \040).
            found.append(Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])))
    return found


@dataclass(frozen=True)
class GroupRef:
    """A cgroup as nft names it: its depth in the hierarchy and a path it can stat."""

    level: int
    path: str


class AppGroups:
    def __init__(self, name: str, state_dir: Path) -> None:
        self.name = check_name(name)
        self._own_mount = state_dir / "cgroup2"
        self.root: Path | None = None
        self._mounted = False

    def _find_root(self) -> Path:
        try:
            mounts = cgroup2_mounts(Path("/proc/self/mountinfo").read_text())
        except OSError:
            mounts = []
        for mount in mounts:
            if mount.is_dir():
                return mount
        # No hierarchy in sight in this mount namespace: mount one for braidd.
        self._own_mount.mkdir(mode=0o700, parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "cgroup2", "cgroup2", str(self._own_mount)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise AppGroupsError(
                "braid direct and braid bonded need cgroup v2, which this system does not "
                f"offer: {done.stderr.strip()}"
            )
        self._mounted = True
        return self._own_mount

    @property
    def base(self) -> Path:
        assert self.root is not None
        return self.root / self.name

    def start(self) -> None:
        self.root = self._find_root()
        try:
            for kind in KINDS:
                (self.base / kind).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self.stop()
            raise AppGroupsError(f"cannot make Braid's cgroups in {self.root}: {exc}") from exc
        log.info("application groups: %s/{%s}", self.base, ",".join(KINDS))

    def ref(self, kind: str) -> GroupRef:
        path = self.base / kind
        level = len(path.relative_to(self.root).parts) if self.root else 0
        return GroupRef(level, os.path.relpath(path, NFT_CGROUP_DIR))

    def join(self, kind: str, pid: int) -> None:
        """Move process ``pid`` into group ``kind``; the programs it starts stay there."""
        if kind not in KINDS:
            raise ValueError(f"{kind!r} is not one of {', '.join(KINDS)}")
        (self.base / kind / "cgroup.procs").write_text(f"{pid}\n")

    def members(self, kind: str) -> list[int]:
        try:
            text = (self.base / kind / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(line) for line in text.split()]

    def stop(self) -> None:
        """Remove the groups that are empty, and braidd's own mount of the hierarchy."""
        if self.root is not None:
            for path in [*(self.base / kind for kind in KINDS), self.base]:
                try:
                    path.rmdir()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise
                    log.warning(
                        "%s still runs programs: left in place (braidd uses it again)", path
                    )
        if self._mounted:
            subprocess.run(["umount", str(self._own_mount)], capture_output=True, check=False)
            self._mounted = False
            with contextlib.suppress(OSError):
                self._own_mount.rmdir()
        self.root = None


__all__ = ["KINDS", "AppGroups", "AppGroupsError", "GroupRef", "cgroup2_mounts", "check_name"]
