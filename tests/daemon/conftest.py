"""Shared by the daemon's tests: the module's test world, an empty network namespace, small
tmpfs mounts."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from braid.netbed import World, unavailable_reason


@pytest.fixture(scope="module")
def world(request) -> Iterator[World]:
    """The test world of the requesting module, built from its ``LINKS`` (and ``LAPTOPS``, if it
    sets one); skipped with the reason when namespaces cannot be built here."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with World(request.module.LINKS, laptops=getattr(request.module, "LAPTOPS", 1)) as w:
        yield w


@pytest.fixture
def empty_netns() -> Iterator[str]:
    """A new network namespace with only loopback up, deleted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to build network namespaces")
    name = f"brdscratch{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "dev", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def nft(empty_netns: str) -> Callable[..., subprocess.CompletedProcess]:
    """``nft(*argv, script=None)``: nft run in a new empty namespace (``script`` on its stdin)."""

    def run(*argv: str, script: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", "netns", "exec", empty_netns, "nft", *argv],
            input=script,
            capture_output=True,
            text=True,
            check=False,
        )

    return run


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``tmpfs(size="64k", read_only=False)`` mounts a tiny tmpfs under tmp_path (a mount, not a
    network change) and returns it; every mount is removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounts: list[Path] = []

    def mount(size: str = "64k", read_only: bool = False) -> Path:
        path = tmp_path / f"tmpfs{len(mounts)}"
        path.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
        mounts.append(path)
        return path

    try:
        yield mount
    finally:
        for path in mounts:
            subprocess.run(["umount", "-l", str(path)], check=False)
