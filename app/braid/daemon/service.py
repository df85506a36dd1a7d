"""braidd: finds and judges the links, owns their routing, the tunnel pool, the SOCKS5 port
and the control socket."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import errno
import functools
import hashlib
import logging
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from braid import memory
from braid.aio import spawn
from braid.daemon import limits
from braid.daemon.control.server import Caller, ControlServer
from braid.daemon.links.classify import CachedClassifier
from braid.daemon.links.model import Link, LinkState, Priority, default_priority
from braid.daemon.links.store import LinkStore, StoreError
from braid.daemon.routing import capture
from braid.daemon.routing.paths import (
    PathManager,
    PathManagerUnavailable,
    plain_address,
    watch_connections,
)
from braid.daemon.routing.policy import (
    SLOTS,
    DeviceView,
    LinkRouting,
    Routing,
    prefixes_of,
)
from braid.daemon.settings import SETTINGS, Settings
from braid.daemon.stats.subflows import count_subflows
from braid.daemon.tunnel.pool import TunnelPool
from braid.daemon.tunnel.socks import SocksServer
from braid.daemon.tunnel.spread import PathLink, Spreading
from braid.daemon.tunnel.transparent import (
    DnsRelay,
    SocksUdp,
    TransparentTcp,
    TransparentUdp,
    serve_dns_over_tcp,
)
from braid.files import load_json, write_json
from braid.protocol import control
from braid.protocol.address import Address
from braid.protocol.control import ControlError, ErrorCode
from braid.protocol.pairing import Pairing, PairingError, parse_pairing
from braid.tunnel_client import Tunnel, TunnelError

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/var/lib/braid")
PAIRING_FILE = "pairing.json"
LINK_POLL = 1.0
SAMPLE_INTERVAL = 1.0
USAGE_SAVE_INTERVAL = 10.0
UP_WAIT = 12.0
NM_REFRESH = 30.0  # NetworkManager's view changes rarely; netlink tells us about links
SUBSCRIBER_BACKLOG = 1 << 20  # a subscriber this far behind is dropped, not buffered forever


@dataclass
class DaemonConfig:
    state_dir: Path = DEFAULT_STATE_DIR
    control_path: Path = Path("/run/braid/control.sock")
    socks: tuple[str, int] = ("127.0.0.1", 1080)
    links: list[tuple[str, str | None, Priority | None]] = field(default_factory=list)
    discover: bool | None = None  # None: the stored setting decides
    sysfs: Path = Path("/sys")


class State:
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DEGRADED = "degraded"


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self._classifier = CachedClassifier(config.sysfs)
        self.links: dict[str, Link] = {}
        self._named = {name: (kind, prio, i) for i, (name, kind, prio) in enumerate(config.links)}
        self.store = LinkStore(config.state_dir)
        self.settings = Settings(config.state_dir)
        # One worker thread: routing changes never interleave, and netlink never blocks the loop.
        self._netlink = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="netlink")
        self._routing: Routing | None = None
        self._paths = PathManager(config.state_dir)
        self.spreading = Spreading(
            self._paths, self._path_links, self._in_netlink, own=self._is_tunnel
        )
        self._path_signature: tuple = ()
        self.pool: TunnelPool | None = None
        self.pairing: Pairing | None = None
        self.prober = None
        self.socks = SocksServer(config.socks, self._take_tunnel)
        self.socks.udp_associate = SocksUdp(self._take_tunnel, config.socks[0]).associate
        self.dns = DnsRelay(self._take_tunnel)
        self.transparent_tcp = TransparentTcp(
            0, self._carry_transparent, self.socks.track, admit=self.socks.admit
        )
        self.transparent_udp = TransparentUdp(0, self._take_tunnel, self.dns)
        self.capture_active = False
        self._server_addresses: list[str] = []
        self.control = ControlServer(
            config.control_path,
            {
                "status": self._cmd_status,
                "subscribe": self._cmd_subscribe,
                "up": self._cmd_up,
                "down": self._cmd_down,
                "links": self._cmd_links,
                "set-link": self._cmd_set_link,
                "set-order": self._cmd_set_order,
                "get-settings": self._cmd_get_settings,
                "set-settings": self._cmd_set_settings,
            },
            changes={"up", "down", "set-link", "set-order", "set-settings"},
        )
        self._stopping = asyncio.Event()
        self._links_changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._counters: dict[str, tuple[float, int, int]] = {}
        self._subscribers: set[asyncio.StreamWriter] = set()
        self.events: collections.deque[dict] = collections.deque(maxlen=50)
        self.connected_since: float | None = None
        self._best: str | None = None
        self._discovered_kinds: dict[str, tuple[str, bool | None]] = {}

    # -- lifecycle ------------------------------------------------------------

    async def _in_netlink(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._netlink, fn, *args)

    async def run(self) -> None:
        _check_state_dir(self.config.state_dir)
        self.store.load()
        self.settings.load()
        self._routing = await self._in_netlink(Routing, self.config.state_dir)
        # A previous run that crashed may have left tables, rules or endpoints behind.
        await self._in_netlink(self._routing.cleanup)
        await self._in_netlink(_remove_capture_table)
        await self._in_netlink(self._routing.raise_limits)
        try:
            await self._in_netlink(self._paths.enable)
            self._watch_connections()
        except (PathManagerUnavailable, OSError) as exc:
            # The in-kernel path manager then opens every link's subflow on every connection.
            log.warning("%s: every connection uses every link from its start", exc)
        try:
            await _starting(
                self.socks.start(), f"cannot listen for SOCKS5 on {self.socks.address}", "--socks"
            )
            await _starting(self.transparent_tcp.start(), "cannot start system-wide TCP capture")
            await _starting(self.transparent_udp.start(), "cannot start system-wide UDP capture")
            await _starting(
                self.control.start(),
                f"cannot create the control socket {self.config.control_path}",
                "--control",
            )
            await self._refresh_links()
            self._watch_netlink()
            self._tasks = [
                spawn(self._link_loop(), name="links"),
                spawn(self._sample_loop(), name="samples"),
                spawn(memory.trim_periodically(), name="malloc-trim"),
            ]
            log.info(
                "braidd ready: links %s",
                ", ".join(f"{link.name} ({link.kind}, {link.priority})" for link in self._ordered())
                or "none yet",
            )
            await self._stopping.wait()
        finally:
            await self._shutdown()

    def stop(self) -> None:
        self._stopping.set()

    async def _shutdown(self) -> None:
        log.info("stopping: removing routes, rules and endpoints")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._down()
        await self._set_capture(False)
        await self.transparent_tcp.stop()
        await self.transparent_udp.stop()
        await self.dns.close()
        for writer in list(self._subscribers):
            writer.close()
        await self.control.stop()
        await self.socks.stop()
        with contextlib.suppress(OSError):
            self.store.save_usage()
        if self._routing is not None:
            await self._in_netlink(self._routing.remove_all)
            await self._in_netlink(self._routing.close)
        await self._in_netlink(self._paths.restore)
        await self._in_netlink(self._paths.close)
        self._netlink.shutdown(wait=True)

    # -- links ----------------------------------------------------------------

    def _watch_netlink(self) -> None:
        """Wake the link loop on every link, address or route change the kernel announces."""
        loop = asyncio.get_running_loop()

        def watch() -> None:
            from pyroute2 import IPRoute

            groups = 0x1 | 0x10 | 0x40 | 0x100 | 0x400  # LINK, IPV4_IFADDR/ROUTE, IPV6_IFADDR/ROUTE
            try:
                with IPRoute() as ipr:
                    ipr.bind(groups=groups)
                    while not self._stopping.is_set():
                        if ipr.get():
                            loop.call_soon_threadsafe(self._links_changed.set)
            except Exception as exc:  # polling still covers us
                if not self._stopping.is_set():
                    log.warning("netlink events unavailable (%s); polling links every second", exc)

        threading.Thread(target=watch, name="netlink-events", daemon=True).start()

    def _watch_connections(self) -> None:
        """Hear of every new MPTCP connection on the laptop (see Spreading.established)."""
        loop = asyncio.get_running_loop()

        def on_established(event) -> None:
            loop.call_soon_threadsafe(self.spreading.established, event)

        def watch() -> None:
            try:
                watch_connections(on_established, self._stopping.is_set)
            except Exception as exc:
                if not self._stopping.is_set():
                    log.warning(
                        "MPTCP events unavailable (%s): other programs' MPTCP connections "
                        "get no extra subflows",
                        exc,
                    )

        threading.Thread(target=watch, name="mptcp-events", daemon=True).start()

    def _is_tunnel(self, remote: tuple[str, int]) -> bool:
        """Is a connection to ``remote`` one of braidd's tunnels to the paired server?"""
        return (
            self.pairing is not None
            and remote[1] == self.pairing.port
            and remote[0] in {plain_address(a) for a in self._server_addresses}
        )

    async def _link_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._links_changed.wait(), LINK_POLL)
            self._links_changed.clear()
            try:
                await self._refresh_links()
            except Exception:
                log.exception("refreshing links failed")

    def _classify(self) -> dict[str, tuple[str, bool | None]]:
        """The interfaces that are links, from sysfs and NetworkManager (runs on a thread)."""
        from braid.daemon.links.networkmanager import merge, read_devices

        now = time.monotonic()
        if now - self._nm_read_at > NM_REFRESH:
            self._nm_devices = read_devices() or {}
            self._nm_read_at = now
        found = {}
        for c in self._classifier.classify_all():
            c = merge(c, self._nm_devices.get(c.name))
            if c.is_link:
                found[c.name] = (c.kind, c.metered)
        return found

    async def _discover(self) -> None:
        """Add the interfaces that are links (Ethernet, Wi-Fi, cellular); drop vanished ones."""
        discover = self.config.discover
        if discover is None:
            discover = self.settings["discover_links"]
        found: dict[str, tuple[str, bool | None]] = {}
        if discover:
            try:
                found = await asyncio.get_running_loop().run_in_executor(None, self._classify)
            except Exception as exc:
                if not self._classify_failed:
                    log.warning("cannot classify interfaces: %s", exc)
                self._classify_failed = True
        self._discovered_kinds = found
        for name in list(self._named) + sorted(found):
            if name not in self.links:
                self._add_link(name)
        for name in list(self.links):
            if name not in self._named and name not in found:
                link = self.links.pop(name)
                self._event("link-removed", link, f"{name} is gone")
                await self._in_netlink(self._routing.remove, name)
                if self.prober is not None:
                    self.prober.remove_link(name)

    def _add_link(self, name: str) -> None:
        used = {link.slot for link in self.links.values()}
        slot = next(s for s in range(SLOTS) if s not in used)
        named = self._named.get(name)
        kind = (named[0] if named else None) or self._discovered_kinds.get(name, ("other", None))[0]
        link = Link(name=name, kind=kind, priority=Priority.ALWAYS, order=0, slot=slot)
        link.configured = named is not None
        self.links[name] = link
        self._apply_choice(link)
        if not link.configured:
            self._event("link-found", link, f"found {name} ({link.kind})")

    def _apply_choice(self, link: Link) -> None:
        """Stored choices win over --link defaults, which win over discovery's guesses."""
        choice = self.store.choice(link.name)
        named = self._named.get(link.name)
        link.kind = choice.kind or (named[0] if named and named[0] else link.kind)
        link.priority = (
            choice.priority
            or (named[1] if named and named[1] else None)
            or default_priority(link.kind)
        )
        if choice.order is not None:
            link.order = choice.order
        elif named is not None:
            link.order = named[2]
        else:
            link.order = 100 + link.slot
        guessed = self._discovered_kinds.get(link.name, (None, None))[1]
        if choice.metered is not None:
            link.metered = choice.metered
        elif guessed is not None:
            link.metered = guessed
        else:
            link.metered = link.kind == "cellular"
        link.cap = choice.cap.to_json() if choice.cap else None

    def _ordered(self) -> list[Link]:
        return sorted(self.links.values(), key=lambda link: (link.order, link.name))

    async def _refresh_links(self) -> None:
        assert self._routing is not None
        await self._discover()
        links = self._ordered()
        views = await self._in_netlink(self._routing.views, [link.name for link in links])
        for link in links:
            await self._refresh_link(link, views[link.name])
        self._update_best()
        await self._update_capture()

    async def _refresh_link(self, link: Link, view: DeviceView | None) -> None:
        assert self._routing is not None
        before = link.state
        if view is None:
            link.state, link.addresses = LinkState.MISSING, []
        elif not (view.up and view.carrier):
            link.state, link.addresses = LinkState.DOWN, []
        elif not (view.addresses4 or view.addresses6):
            link.state, link.addresses = LinkState.NO_ADDRESS, []
        else:
            link.state = LinkState.UP
            link.addresses = [a for a, _ in view.addresses4 + view.addresses6]
            link.subnets = list(prefixes_of(view.addresses4) + prefixes_of(view.addresses6))
            # Keep the last gateway seen: a flap flushes the default route before it returns.
            link.gateway4 = view.gateway4 or link.gateway4
            link.gateway6 = view.gateway6 or link.gateway6
        if before is not link.state:
            if link.state is LinkState.UP:
                self._event("link-up", link, f"{link.name} is up")
            elif before is LinkState.UP:
                self._event("link-down", link, f"{link.name} is {link.state}")
        self._update_cap(link)
        link.effective = link.priority
        if link.capped and link.cap:
            link.effective = Priority(link.cap["then"])
        if link.state is LinkState.UP and link.effective is not Priority.NEVER and view is not None:
            want = LinkRouting(
                device=link.name,
                ifindex=view.ifindex,
                slot=link.slot,
                addresses4=tuple(a for a, _ in view.addresses4),
                addresses6=tuple(a for a, _ in view.addresses6),
                prefixes4=prefixes_of(view.addresses4),
                prefixes6=prefixes_of(view.addresses6),
                gateway4=link.gateway4,
                gateway6=link.gateway6,
                backup=link.effective is Priority.BACKUP,
            )
            await self._in_netlink(self._routing.apply, want)
            if link.alive is False:
                await self._in_netlink(self._routing.withdraw, link.name)
            else:
                await self._in_netlink(self._routing.reinstate, link.name)
            link.carrying = link.alive is not False
            self._probe(link)
        else:
            await self._in_netlink(self._routing.remove, link.name)
            link.carrying = False
            if self.prober is not None:
                self.prober.remove_link(link.name)
                link.alive = None
                link.health = {}

    def _update_best(self) -> None:
        best = self.best_link()
        name = best.name if best else None
        if name != self._best:
            if self._best is not None and self.pool is not None and name is not None:
                self._event(
                    "failover", best, f"new connections now start on {name}", previous=self._best
                )
            elif self._best is not None and self.pool is not None and self.pool.connected:
                # Every link went silent at once: either all of them are down or the server is.
                # (Once the tunnels have failed too, "server-unreachable" has said so already.)
                self._event(
                    "no-link",
                    None,
                    "no link reaches the server (is it down, or are all links offline?)",
                    previous=self._best,
                )
            self._best = name
            if self.pool is not None:
                self.pool.refresh()
        self._reconcile_paths()

    def _path_links(self) -> list[PathLink]:
        """The links as path management sees them, best first (see best_link)."""
        applied = self._routing.applied() if self._routing is not None else {}
        out = []
        for wanted in (Priority.ALWAYS, Priority.BACKUP):
            for link in self._ordered():
                routing = applied.get(link.name)
                if link.effective is not wanted or routing is None:
                    continue
                out.append(
                    PathLink(
                        name=link.name,
                        ifindex=routing.ifindex,
                        addresses=tuple(link.addresses),
                        local_ids=(
                            routing.endpoint_id(socket.AF_INET),
                            routing.endpoint_id(socket.AF_INET6),
                        ),
                        backup=wanted is Priority.BACKUP,
                        usable=link.usable,
                        rtt_ms=link.health.get("rtt_ms"),
                    )
                )
        return out

    def _reconcile_paths(self) -> None:
        """When a link's use changes (dead, back, priority, address), fix every open flow."""
        if not self.spreading.active:
            return
        signature = tuple(
            (p.name, p.ifindex, p.addresses, p.backup, p.usable) for p in self._path_links()
        )
        if signature != self._path_signature:
            self._path_signature = signature
            spawn(self.spreading.reconcile(), name="reconcile-paths")

    def best_link(self, family: int | None = None) -> Link | None:
        """The link new connections start on: ``always`` before ``backup``, then the order."""
        for wanted in (Priority.ALWAYS, Priority.BACKUP):
            for link in self._ordered():
                if link.effective is not wanted or not link.usable:
                    continue
                if family is None or any(
                    (":" in a) == (family == socket.AF_INET6) for a in link.addresses
                ):
                    return link
        return None

    def best_source(self, family: int) -> str | None:
        link = self.best_link(family)
        if link is None:
            return None
        return next(a for a in link.addresses if (":" in a) == (family == socket.AF_INET6))

    # -- health -----------------------------------------------------------------

    def _probe(self, link: Link) -> None:
        if self.prober is None or self._probe_family is None:
            return
        source = next(
            (a for a in link.addresses if (":" in a) == (self._probe_family == socket.AF_INET6)),
            None,
        )
        if source is None:
            self.prober.remove_link(link.name)
        else:
            self.prober.set_link(link.name, link.name, source)

    def _on_health(self, name: str, alive: bool) -> None:
        link = self.links.get(name)
        if link is None or link.alive == alive:
            return
        was = link.alive
        link.alive = alive
        if not alive:
            self._event(
                "link-lost", link, f"{name} stopped answering: taken out of all connections"
            )
        elif was is False:
            self._event("link-back", link, f"{name} answers again: carrying traffic")
        spawn(self._act_on_health(link), name=f"health-{name}")

    async def _act_on_health(self, link: Link) -> None:
        assert self._routing is not None
        if link.alive is False:
            await self._in_netlink(self._routing.withdraw, link.name)
            link.carrying = False
        elif link.state is LinkState.UP and link.effective is not Priority.NEVER:
            await self._in_netlink(self._routing.reinstate, link.name)
            link.carrying = True
        self._update_best()

    async def _start_prober(self, pairing: Pairing) -> None:
        try:
            from braid.daemon.links.health import Prober
        except ImportError as exc:
            log.warning("health probes unavailable: %s", exc)
            return
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(pairing.host, pairing.port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            log.warning("health probes off: cannot resolve %s: %s", pairing.host, exc)
            return
        family, _, _, _, sockaddr = infos[0]
        key = bytes.fromhex(hashlib.sha256(pairing.token.encode()).hexdigest())
        self._probe_family = family
        self.prober = Prober(
            key,
            (sockaddr[0], sockaddr[1]),
            on_change=self._on_health,
            interval=self.settings["probe_interval_ms"] / 1000,
        )
        await self.prober.start()
        for link in self._ordered():
            if link.state is LinkState.UP and link.effective is not Priority.NEVER:
                self._probe(link)

    async def _stop_prober(self) -> None:
        prober, self.prober = self.prober, None
        self._probe_family = None
        if prober is not None:
            await prober.stop()
        for link in self.links.values():
            if link.alive is False and self._routing is not None:
                await self._in_netlink(self._routing.reinstate, link.name)
            link.alive = None
            link.health = {}

    _probe_family: int | None = None
    _nm_read_at = -1e9
    _nm_devices: dict = {}
    _classify_failed = False

    # -- counters, usage and caps ---------------------------------------------

    async def _sample_loop(self) -> None:
        last_save = time.monotonic()
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL)
            await self.spreading.shrink_idle()
            try:
                self._sample_counters(await self._count_subflows())
                if time.monotonic() - last_save > USAGE_SAVE_INTERVAL:
                    self.store.save_usage()
                    last_save = time.monotonic()
                self._publish({"event": "sample", **self.status(brief=True)})
            except Exception:
                log.exception("sampling failed")

    async def _count_subflows(self) -> dict[str, int]:
        """The tunnels' subflows by local address; a kernel dump, so read off the event loop."""
        pool = self.pool
        if pool is None:
            return {}
        server = list(self._server_addresses)
        return await asyncio.to_thread(count_subflows, server, pool.pairing.port)

    def _sample_counters(self, subflows: dict[str, int]) -> None:
        now = time.monotonic()
        counters = psutil.net_io_counters(pernic=True)
        for link in self.links.values():
            link.subflows = sum(subflows.get(address, 0) for address in link.addresses)
            if self.prober is not None:
                with contextlib.suppress(KeyError):
                    link.health = self.prober.health(link.name).to_json()
            io = counters.get(link.name)
            if io is None:
                link.rx_bps = link.tx_bps = 0.0
                continue
            last = self._counters.get(link.name)
            if last is not None and now > last[0]:
                elapsed = now - last[0]
                rx = max(0, io.bytes_recv - last[1])
                tx = max(0, io.bytes_sent - last[2])
                link.rx_bps = rx * 8 / elapsed
                link.tx_bps = tx * 8 / elapsed
                self.store.count(link.name, rx + tx)
                if self._update_cap(link):
                    self._links_changed.set()
            link.rx_bytes, link.tx_bytes = io.bytes_recv, io.bytes_sent
            self._counters[link.name] = (now, io.bytes_recv, io.bytes_sent)

    def _update_cap(self, link: Link) -> bool:
        """Refresh the link's usage; True when it just reached or left its cap."""
        link.used_bytes = self.store.used(link.name)
        capped = bool(link.cap) and link.used_bytes >= link.cap["limit_bytes"]
        if capped == link.capped:
            return False
        link.capped = capped
        if capped:
            self._event(
                "cap-reached",
                link,
                f"{link.name} reached its data cap ({link.used_bytes / 1e6:.0f} MB): "
                f"now {link.cap['then']}",
            )
            self.store.save_usage()
        return True

    # -- events ---------------------------------------------------------------

    def _event(self, kind: str, link: Link | None, message: str, **extra: Any) -> None:
        event = {
            "event": kind,
            "t": time.time(),
            "link": link.name if link else None,
            "message": message,
            **extra,
        }
        self.events.append(event)
        log.info("%s", message)
        self._publish(event)

    def _publish(self, message: dict) -> None:
        if not self._subscribers:
            return
        line = control.encode(message)
        for writer in list(self._subscribers):
            if writer.is_closing() or writer.transport.get_write_buffer_size() > SUBSCRIBER_BACKLOG:
                self._subscribers.discard(writer)
                writer.close()
                continue
            writer.write(line)

    # -- connection -----------------------------------------------------------

    async def _take_tunnel(self) -> Tunnel:
        if self.pool is None:
            raise TunnelError("Braid is not connected (run: braid up)")
        tunnel = await self.pool.take()
        flow = self.spreading.adopt(tunnel.sock, tunnel.local[0])
        if flow is not None:
            tunnel.on_data = functools.partial(self.spreading.carried, flow)
        return tunnel

    def _pool_changed(self) -> None:
        self._links_changed.set()  # re-decide capture (fallback to direct, or block)
        pool = self.pool
        if pool is not None and pool.connected and self.connected_since is None:
            self.connected_since = time.time()
            self._event("connected", None, f"connected to {pool.pairing.server}")
        elif pool is not None and not pool.connected and self.connected_since is not None:
            self.connected_since = None
            self._event("server-unreachable", None, f"lost the server: {pool.last_error}")

    async def up(self, pairing: Pairing) -> dict[str, Any]:
        if self.pool is not None and self.pool.pairing == pairing and self.pool.connected:
            await self._update_capture()
            return self.status()
        await self._down()
        self.pairing = pairing
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(pairing.host, pairing.port)
            self._server_addresses = sorted({info[4][0] for info in infos})
        except OSError as exc:
            raise ControlError(
                ErrorCode.FAILED, f"cannot resolve the server name {pairing.host}: {exc}"
            ) from None
        self._save_pairing(pairing)
        self.pool = TunnelPool(
            pairing, self.best_source, self.settings["pool_size"], on_change=self._pool_changed
        )
        await self.pool.start()
        await self._start_prober(pairing)
        # Wait for the first connection so the caller learns at once about a wrong token.
        deadline = time.monotonic() + UP_WAIT
        while time.monotonic() < deadline and not (self.pool.connected or self.pool.fatal_error):
            await asyncio.sleep(0.05)
        if self.pool.fatal_error:
            message = self.pool.fatal_error
            await self._down()
            raise ControlError(ErrorCode.FAILED, message)
        await self._update_capture()
        return self.status()

    async def _down(self) -> None:
        pool, self.pool = self.pool, None
        self.connected_since = None
        await self._set_capture(False)
        await self._stop_prober()
        if pool is not None:
            await pool.stop()
            self._event("disconnected", None, "disconnected")

    # -- system-wide mode -------------------------------------------------------

    async def _carry_transparent(self, reader, writer, address: Address) -> None:
        if address.port == 53:
            await serve_dns_over_tcp(reader, writer, self.dns)
        else:
            await self.socks.carry(reader, writer, address)

    def capture_in_force(self) -> str:
        """What happens to traffic that is not sent to the SOCKS5 port."""
        if self.settings["mode"] != "system" or self.pool is None:
            return "off"
        if self.pool.connected:
            return "tunnel"
        return "blocked" if self.settings["when_server_unreachable"] == "block" else "direct"

    async def _update_capture(self) -> None:
        assert self._routing is not None
        want = self.capture_in_force() in ("tunnel", "blocked")
        await self._set_capture(want)

    async def _set_capture(self, want: bool) -> None:
        if self._routing is None:
            return
        if not want:
            if self.capture_active:
                await self._in_netlink(_remove_capture_table)
                await self._in_netlink(self._routing.remove_capture_routing)
                self.capture_active = False
                self._event("capture-off", None, "system-wide capture off")
            return
        plan = capture.CapturePlan(
            tcp_port=self.transparent_tcp.port,
            udp_port=self.transparent_udp.port,
            server_addresses=self._server_addresses,
            link_subnets=sorted({net for link in self.links.values() for net in link.subnets}),
            bypass=capture.parse_bypass(self.settings["bypass"]),
            reject_quic=self.settings["prefer_tcp_for_web"],
        )
        if plan == self._capture_plan and self.capture_active:
            return
        try:
            await self._in_netlink(self._routing.install_capture_routing, capture.UDP_MARK)
            await self._in_netlink(capture.install, plan)
        except (capture.CaptureError, OSError) as exc:
            log.error("system-wide capture failed: %s", exc)
            self._event("capture-failed", None, f"system-wide mode could not start: {exc}")
            return
        self._capture_plan = plan
        if not self.capture_active:
            self.capture_active = True
            self._event("capture-on", None, "system-wide capture on: all traffic through Braid")

    _capture_plan: capture.CapturePlan | None = None

    # -- state ----------------------------------------------------------------

    def state(self) -> str:
        if self.pool is None:
            return State.DISCONNECTED
        if not self.pool.connected:
            return State.CONNECTING
        wanted = [link for link in self.links.values() if link.priority is not Priority.NEVER]
        if any(link.state is not LinkState.UP or link.alive is False for link in wanted):
            return State.DEGRADED
        return State.CONNECTED

    def status(self, brief: bool = False) -> dict[str, Any]:
        pool = self.pool
        out = {
            "state": self.state(),
            "t": time.time(),
            "server": pool.pairing.server if pool else None,
            "fingerprint": pool.pairing.fingerprint if pool else None,
            "error": pool.last_error if pool else None,
            "connected_since": self.connected_since,
            "socks": self.socks.address,
            "best_link": self._best,
            "mode": self.settings["mode"],
            "capture": {
                "active": self.capture_active,
                "in_force": self.capture_in_force(),
                "when_server_unreachable": self.settings["when_server_unreachable"],
                "prefer_tcp_for_web": self.settings["prefer_tcp_for_web"],
                "udp_sessions": self.transparent_udp.sessions.count,
                "dns_queries": self.dns.queries,
                "dns_failures": self.dns.failures,
            },
            "links": [link.to_json() for link in self._ordered()],
            "tunnel": {
                "pool_ready": pool.ready_count if pool else 0,
                "flows_active": self.socks.active_flows,
                "flows_total": self.socks.flows_total,
                "flows_failed": self.socks.flows_failed,
                "bytes_up": self.socks.counters.up,
                "bytes_down": self.socks.counters.down,
                "rx_bps": sum(link.rx_bps for link in self.links.values() if link.carrying),
                "tx_bps": sum(link.tx_bps for link in self.links.values() if link.carrying),
                "paths": self.spreading.summary(),
            },
        }
        if not brief:
            out["events"] = list(self.events)[-20:]
            out["problems"] = self.store.problems + self.settings.problems
        return out

    # -- pairing storage ------------------------------------------------------

    def _save_pairing(self, pairing: Pairing) -> None:
        write_json(self.config.state_dir / PAIRING_FILE, {"uri": pairing.uri()})

    def saved_pairing(self) -> Pairing | None:
        path = self.config.state_dir / PAIRING_FILE
        try:
            data = load_json(path.read_text())
            uri = data.get("uri") if isinstance(data, dict) else None
            if not isinstance(uri, str):
                raise ValueError("no pairing URI (uri) in it")
            return parse_pairing(uri)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # PairingError is a ValueError
            log.warning("ignoring unreadable %s: %s", path, exc)
            return None

    # -- control commands -----------------------------------------------------

    def _cannot_save(self, exc: OSError) -> ControlError:
        return ControlError(
            ErrorCode.FAILED,
            f"cannot save to {self.config.state_dir}: {exc.strerror or exc} — nothing was "
            "changed; free some disk space or fix the directory's permissions",
        )

    async def _cmd_status(self, caller: Caller, request: dict) -> dict:
        return self.status()

    async def _cmd_subscribe(self, caller: Caller, request: dict) -> dict:
        self._subscribers.add(request["_writer"])
        return {"interval": SAMPLE_INTERVAL, "status": self.status()}

    async def _cmd_links(self, caller: Caller, request: dict) -> list:
        return [link.to_json() for link in self._ordered()]

    async def _cmd_up(self, caller: Caller, request: dict) -> dict:
        uri = request.get("pairing")
        if uri is not None and not isinstance(uri, str):
            raise ControlError(ErrorCode.INVALID_ARGUMENT, "pairing must be a string")
        if uri:
            try:
                pairing = parse_pairing(uri)
            except PairingError as exc:
                raise ControlError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
        else:
            pairing = self.pairing or self.saved_pairing()
            if pairing is None:
                raise ControlError(
                    ErrorCode.INVALID_ARGUMENT,
                    "Braid is not paired with a server yet: run  braid up --pairing -  and paste "
                    "the URI that braid-server init printed",
                )
        mode = request.get("mode")
        if mode is not None:
            try:
                self.settings.update({"mode": mode})
            except ValueError as exc:
                raise ControlError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
        log.info("up requested by %s (server %s)", caller.describe(), pairing.server)
        return await self.up(pairing)

    async def _cmd_down(self, caller: Caller, request: dict) -> dict:
        log.info("down requested by %s", caller.describe())
        await self._down()
        return self.status()

    async def _cmd_set_link(self, caller: Caller, request: dict) -> dict:
        name = request.get("link")
        if not isinstance(name, str) or name not in self.links:
            known = ", ".join(self.links) or "none"
            raise ControlError(ErrorCode.INVALID_ARGUMENT, f"no link {name!r} (links: {known})")
        changes = {
            k: request[k] for k in ("kind", "priority", "order", "metered", "cap") if k in request
        }
        if not changes:
            raise ControlError(
                ErrorCode.INVALID_ARGUMENT,
                "nothing to change: give priority, order, metered or cap",
            )
        choice = self.store.choice(name)
        before = choice.to_json()
        try:
            choice.update(changes)
        except StoreError as exc:
            choice.update(before)
            raise ControlError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
        try:
            self.store.save_choices()
        except OSError as exc:
            choice.update(before)
            raise self._cannot_save(exc) from None
        link = self.links[name]
        self._apply_choice(link)
        log.info("link %s changed by %s: %s", name, caller.describe(), changes)
        await self._refresh_links()
        return link.to_json()

    async def _cmd_set_order(self, caller: Caller, request: dict) -> list:
        names = request.get("links")
        if not isinstance(names, list) or sorted(names) != sorted(self.links):
            raise ControlError(
                ErrorCode.INVALID_ARGUMENT,
                f"links must list every link exactly once: {', '.join(sorted(self.links))}",
            )
        before = {name: self.store.choice(name).order for name in names}
        for order, name in enumerate(names):
            self.store.choice(name).order = order
        try:
            self.store.save_choices()
        except OSError as exc:
            for name, order in before.items():
                self.store.choice(name).order = order
            raise self._cannot_save(exc) from None
        for name in names:
            self._apply_choice(self.links[name])
        await self._refresh_links()
        return [link.to_json() for link in self._ordered()]

    async def _cmd_get_settings(self, caller: Caller, request: dict) -> dict:
        return {
            "values": dict(self.settings.values),
            "schema": [s.describe() for s in SETTINGS],
        }

    async def _cmd_set_settings(self, caller: Caller, request: dict) -> dict:
        changes = request.get("settings")
        if not isinstance(changes, dict):
            raise ControlError(ErrorCode.INVALID_ARGUMENT, "settings must be an object")
        before = dict(self.settings.values)
        try:
            if "bypass" in changes and isinstance(changes["bypass"], list):
                capture.parse_bypass(changes["bypass"])
            self.settings.update(changes)
        except ValueError as exc:
            raise ControlError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
        except OSError as exc:
            self.settings.values = before
            raise self._cannot_save(exc) from None
        await self._update_capture()
        return dict(self.settings.values)


class StartupError(Exception):
    """braidd cannot start; the message says why and what to do."""


def _check_state_dir(state_dir: Path) -> None:
    """The state directory exists (made 0700) and takes files, or a StartupError says why."""
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=state_dir):
            pass
    except OSError as exc:
        raise StartupError(
            f"cannot use the state directory {state_dir}: {exc.strerror or exc} — fix its "
            "permissions or free some space, or choose another with --state-dir"
        ) from None


async def _starting(step: Coroutine[Any, Any, None], what: str, option: str = "") -> None:
    try:
        await step
    except OSError as exc:
        hint = " — is another braidd or proxy running?" if exc.errno == errno.EADDRINUSE else ""
        hint += f" ({option} chooses another)" if option else ""
        raise StartupError(f"{what}: {exc.strerror or exc}{hint}") from None


def run_daemon(config: DaemonConfig) -> int:
    """Run in the foreground until SIGTERM or SIGINT; returns the exit code."""
    log.info("open-files limit: %d", limits.raise_nofile())
    daemon = Daemon(config)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.stop)
        limits.throttle_accept_errors(loop)
        if os.environ.get("BRAID_TRACEMALLOC"):
            _trace_memory(loop, Path(os.environ["BRAID_TRACEMALLOC"]))
        await daemon.run()

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(main())
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    return 0


def _remove_capture_table() -> None:
    try:
        capture.remove()
    except capture.CaptureError as exc:
        log.debug("no nftables table to remove: %s", exc)


def _trace_memory(loop: asyncio.AbstractEventLoop, out: Path) -> None:
    """For hunting leaks: SIGUSR2 writes the largest allocation sites to ``out``."""
    import tracemalloc

    tracemalloc.start(8)

    def dump() -> None:
        snapshot = tracemalloc.take_snapshot()
        with open(out, "a") as f:
            current, peak = tracemalloc.get_traced_memory()
            f.write(
                f"--- {time.time():.0f} traced {current / 1e6:.2f} MB (peak {peak / 1e6:.2f})\n"
            )
            for stat in snapshot.statistics("traceback")[:15]:
                f.write(f"{stat.size / 1e6:.2f} MB in {stat.count} blocks\n")
                f.write("\n".join(stat.traceback.format()[-6:]) + "\n")

    loop.add_signal_handler(signal.SIGUSR2, dump)


def cleanup(state_dir: Path) -> None:
    """Remove what a crashed run left: Braid's tables, rules, endpoints and nftables table,
    and restore the MPTCP limits."""
    routing = Routing(state_dir)
    try:
        routing.cleanup()
    finally:
        routing.close()
    PathManager(state_dir).restore()
    _remove_capture_table()
