"""Everything braidd reads from or writes to the system, behind one interface.

Netlink (routes, rules, MPTCP endpoints and the path manager), nftables (system-wide capture,
headroom for calls), sysfs and NetworkManager (which interfaces are links), /proc (counters,
subflows) and name lookups. The reconciler talks only to a :class:`Platform`; the tests give it a recording fake
(tests/daemon/fake_platform.py) and run it without root.

Writes and netlink reads run on one worker thread, in the order they were asked for, so routing
changes never interleave and netlink never blocks the event loop; other slow reads run on the
default executor.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import psutil

from braid.daemon.routing import capture, headroom
from braid.daemon.routing.paths import PathManager, PathManagerUnavailable
from braid.daemon.routing.policy import DeviceView, LinkRouting, Routing

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How old NetworkManager's view may get: its connectivity (a captive portal signed in) is
#: only polled; netlink tells about the links themselves.
NM_REFRESH = 5.0


class PlatformBase(Protocol):
    """What the reconciler needs of the system."""

    paths: PathManager

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def views(self, names: list[str]) -> dict[str, DeviceView | None]: ...
    async def discover(self) -> dict[str, tuple[str, bool | None]]: ...
    async def connectivity(self) -> dict[str, str]: ...
    async def interfaces(self) -> list[Any]: ...
    async def apply(self, routing: dict[str, LinkRouting | None], withdrawn: set[str]) -> None: ...
    def applied(self) -> dict[str, LinkRouting]: ...
    async def capture(self, plan: capture.CapturePlan | None) -> None: ...
    async def headroom(
        self,
        before: dict[str, int] | None,
        limits: dict[str, int],
        gated: set[str],
        servers: list[str],
        port: int,
    ) -> None: ...
    async def nft_tables(self) -> set[str] | None: ...
    async def resolve(self, host: str, port: int) -> list[str]: ...
    async def counters(self) -> dict[str, tuple[int, int]]: ...
    async def in_netlink(self, fn: Callable[..., T], *args: Any) -> T: ...


class Platform:
    """The real system."""

    def __init__(self, state_dir, classifier) -> None:
        self._state_dir = state_dir
        self._classifier = classifier
        self._netlink = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="netlink")
        self._routing: Routing | None = None
        self.paths = PathManager(state_dir)
        self._nm_read_at = -1e9
        self._nm_view: Any = None  # networkmanager.NmView, or None: no NetworkManager
        self._classify_failed = False
        self._capture_routing = False

    async def in_netlink(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._netlink, fn, *args)

    async def start(self) -> None:
        self._routing = await self.in_netlink(Routing, self._state_dir)
        # A previous run that crashed may have left tables, rules or endpoints behind.
        await self.in_netlink(self._routing.cleanup)
        await self.in_netlink(remove_capture_table)
        await self.in_netlink(headroom.remove)
        await self.in_netlink(self._routing.raise_limits)
        try:
            await self.in_netlink(self.paths.enable)
        except (PathManagerUnavailable, OSError) as exc:
            # The in-kernel path manager then opens every link's subflow on every connection.
            log.warning("%s: every connection uses every link from its start", exc)
        # Only the in-kernel path manager reads endpoints: then NetworkManager's must be braidd's.
        self._routing.take_over_endpoints = not self.paths.active

    async def stop(self) -> None:
        await self.capture(None)
        await self.in_netlink(headroom.remove)
        if self._routing is not None:
            await self.in_netlink(self._routing.remove_all)
            await self.in_netlink(self._routing.close)
        await self.in_netlink(self.paths.restore)
        await self.in_netlink(self.paths.close)
        self._netlink.shutdown(wait=True)

    async def views(self, names: list[str]) -> dict[str, DeviceView | None]:
        assert self._routing is not None
        return await self.in_netlink(self._routing.views, names)

    def _nm(self) -> Any:
        """NetworkManager's view, read again when older than NM_REFRESH (blocking)."""
        from braid.daemon.links.networkmanager import read_view

        now = time.monotonic()
        if now - self._nm_read_at > NM_REFRESH:
            self._nm_view = read_view()
            self._nm_read_at = now
        return self._nm_view

    def _classify(self) -> dict[str, tuple[str, bool | None]]:
        from braid.daemon.links.networkmanager import merge

        view = self._nm()
        devices = view.devices if view is not None else {}
        found = {}
        for c in self._classifier.classify_all():
            c = merge(c, devices.get(c.name))
            if c.is_link:
                found[c.name] = (c.kind, c.metered)
        return found

    async def discover(self) -> dict[str, tuple[str, bool | None]]:
        """The interfaces that are links (sysfs and NetworkManager), off the event loop."""
        try:
            found = await asyncio.get_running_loop().run_in_executor(None, self._classify)
        except Exception as exc:
            if not self._classify_failed:
                log.warning("cannot classify interfaces: %s", exc)
            self._classify_failed = True
            return {}
        return found

    async def connectivity(self) -> dict[str, str]:
        """NetworkManager's connectivity per device it checked ("portal": sign-in required)."""
        try:
            view = await asyncio.get_running_loop().run_in_executor(None, self._nm)
        except Exception as exc:  # read_view never raises; this is the executor's own failure
            log.debug("NetworkManager's connectivity: %s", exc)
            return {}
        if view is None:
            return {}
        return {n: d.connectivity for n, d in view.devices.items() if d.connectivity}

    async def interfaces(self) -> list[Any]:
        """Every interface with what discovery makes of it (sysfs, off the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(None, self._classifier.classify_all)

    def _apply(self, routing: dict[str, LinkRouting | None], withdrawn: set[str]) -> None:
        assert self._routing is not None
        for device in set(self._routing.applied()) - set(routing):
            self._routing.remove(device)
        for device, want in routing.items():
            if want is None:
                self._routing.remove(device)
                continue
            self._routing.apply(want)
            if device in withdrawn:
                self._routing.withdraw(device)
            else:
                self._routing.reinstate(device)

    async def apply(self, routing: dict[str, LinkRouting | None], withdrawn: set[str]) -> None:
        """Make every link's table, rules and endpoints match ``routing`` (idempotent)."""
        await self.in_netlink(self._apply, routing, withdrawn)

    def applied(self) -> dict[str, LinkRouting]:
        return self._routing.applied() if self._routing is not None else {}

    async def capture(self, plan: capture.CapturePlan | None) -> None:
        """Install system-wide capture as ``plan`` says, or remove it (None)."""
        assert self._routing is not None
        if plan is None:
            await self.in_netlink(remove_capture_table)
            if self._capture_routing:
                await self.in_netlink(self._routing.remove_capture_routing)
                self._capture_routing = False
            return
        await self.in_netlink(self._routing.install_capture_routing, capture.UDP_MARK)
        self._capture_routing = True
        await self.in_netlink(capture.install, plan)

    async def headroom(
        self,
        before: dict[str, int] | None,
        limits: dict[str, int],
        gated: set[str],
        servers: list[str],
        port: int,
    ) -> None:
        """Limit the tunnels' downloads per link, dropping over the limit on the ``gated`` ones
        (raises headroom.HeadroomError)."""
        await self.in_netlink(headroom.install, before, limits, gated, servers, port)

    async def nft_tables(self) -> set[str] | None:
        """The nftables tables present ("inet braid", ...); None if nft cannot say."""
        return await self.in_netlink(capture.list_tables)

    async def resolve(self, host: str, port: int) -> list[str]:
        """The server's addresses (raises OSError)."""
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    async def counters(self) -> dict[str, tuple[int, int]]:
        """Bytes received and sent per interface (/proc, off the event loop)."""
        found = await asyncio.to_thread(psutil.net_io_counters, pernic=True)
        return {name: (io.bytes_recv, io.bytes_sent) for name, io in found.items()}


def remove_capture_table() -> None:
    try:
        capture.remove()
    except capture.CaptureError as exc:
        log.debug("no nftables table to remove: %s", exc)


__all__ = ["Platform", "PlatformBase", "remove_capture_table"]
