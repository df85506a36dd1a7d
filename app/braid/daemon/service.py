"""braidd: the assembly of its parts.

The reconciler (:mod:`braid.daemon.reconciler`) is the one writer of the daemon's state; the
link policy (:mod:`braid.daemon.policy`) decides, without I/O; the platform
(:mod:`braid.daemon.platform`) does the system's I/O; the commands (:mod:`braid.daemon.commands`)
check control requests and hand changes to the writer. This module wires them to the SOCKS5
port, system-wide capture, the control socket and the timers, and starts and stops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from braid import memory
from braid.aio import spawn
from braid.daemon import limits, policy
from braid.daemon.commands import SAMPLE_INTERVAL, Commands, read_saved_pairing
from braid.daemon.control.server import ControlServer
from braid.daemon.links.classify import CachedClassifier
from braid.daemon.links.model import Priority
from braid.daemon.links.store import LinkStore
from braid.daemon.platform import Platform, remove_capture_table
from braid.daemon.reconciler import PAIRING_FILE, Parts, Reconciler, real_parts
from braid.daemon.routing import headroom
from braid.daemon.routing.apps import DEFAULT_NAME as DEFAULT_CGROUP
from braid.daemon.routing.apps import AppGroups, AppGroupsError
from braid.daemon.routing.capture import OWN_MARK
from braid.daemon.routing.paths import PathManager, watch_connections
from braid.daemon.routing.policy import Routing
from braid.daemon.settings import Settings
from braid.daemon.stats.subflows import count_subflows
from braid.daemon.tunnel.bypass import NameBypass
from braid.daemon.tunnel.datagram import DatagramFlows, DatagramPath
from braid.daemon.tunnel.socks import SocksServer
from braid.daemon.tunnel.spread import Spreading
from braid.daemon.tunnel.transparent import (
    DnsRelay,
    SocksUdp,
    TransparentTcp,
    TransparentUdp,
    serve_dns_over_tcp,
)
from braid.protocol import control
from braid.protocol.address import Address
from braid.protocol.pairing import Pairing
from braid.tunnel_client import Tunnel, TunnelError

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/var/lib/braid")
LINK_POLL = 1.0  # netlink events wake the reconciler at once; this catches what they miss
USAGE_SAVE_INTERVAL = 10.0
SUBSCRIBER_BACKLOG = 1 << 20  # a subscriber this far behind is dropped, not buffered forever
# On stop, connections get this long to close cleanly, then are reset: a server that went away
# would hold every TLS close for seconds, and each shutdown of the computer with it.
CLOSE_GRACE = 0.25
RESUME_RETRY = (1.0, 30.0)  # seconds: the first and the longest wait to resolve the server again

__all__ = ["PAIRING_FILE", "Daemon", "DaemonConfig", "StartupError", "cleanup", "run_daemon"]


@dataclass
class DaemonConfig:
    state_dir: Path = DEFAULT_STATE_DIR
    control_path: Path = Path("/run/braid/control.sock")
    socks: tuple[str, int] = ("127.0.0.1", 1080)
    links: list[tuple[str, str | None, Priority | None]] = field(default_factory=list)
    discover: bool | None = None  # None: the stored setting decides
    sysfs: Path = Path("/sys")
    cgroup: str = DEFAULT_CGROUP  # the name of Braid's cgroups for `braid direct` and `bonded`


class Daemon:
    def __init__(self, config: DaemonConfig, parts: Parts | None = None, platform=None) -> None:
        self.config = config
        self.store = LinkStore(config.state_dir)
        self.settings = Settings(config.state_dir)
        self.platform = platform or Platform(config.state_dir, CachedClassifier(config.sysfs))
        self.spreading = Spreading(
            self.platform.paths, self._path_links, self.platform.in_netlink, own=self._is_tunnel
        )
        named = {
            name: policy.Named(kind, prio, i) for i, (name, kind, prio) in enumerate(config.links)
        }
        self.socks = SocksServer(config.socks, self._take_tunnel)
        self.datagram = DatagramPath(
            self._take_control_tunnel,
            lambda: self.reconciler.datagram_server(),
            lambda: self.reconciler.datagram_links(),
            mark=OWN_MARK,
        )
        self.socks.udp_associate = SocksUdp(
            self._take_tunnel, config.socks[0], self._udp_flows
        ).associate
        self.dns = DnsRelay(self._take_control_tunnel)
        self.transparent_tcp = TransparentTcp(
            0, self._carry_transparent, self.socks.track, admit=self.socks.admit
        )
        self.transparent_udp = TransparentUdp(0, self._take_tunnel, self.dns, self._udp_flows)
        self.reconciler = Reconciler(
            self.platform,
            self.store,
            self.settings,
            config.state_dir,
            named,
            config.discover,
            self.spreading,
            parts or real_parts(),
            publish=self._publish,
            capture_ports=lambda: (self.transparent_tcp.port, self.transparent_udp.port),
            call_links=lambda: self.datagram.realtime_links(self.reconciler.best),
        )
        self.datagram.on_realtime = self.reconciler.poke
        self.name_bypass = NameBypass(
            lambda: self.settings["bypass"], lambda: self.reconciler.capture_active
        )
        self.dns.on_answer = self.name_bypass.learn
        self._subscribers: set[asyncio.StreamWriter] = set()
        self.commands = Commands(
            self.reconciler, self.settings, config.state_dir, self.status, self._subscribers.add
        )
        self.control = ControlServer(
            config.control_path, self.commands.table(), changes=set(Commands.CHANGES)
        )
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    # -- lifecycle ------------------------------------------------------------

    async def run(self) -> None:
        _check_state_dir(self.config.state_dir)
        self.store.load()
        self.settings.load()
        await self.platform.start()
        await self.commands.start()
        self._start_app_groups()
        if self.spreading.active:
            self._watch_connections()
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
            await self.reconciler.reconcile()
            self.datagram.start()
            self._watch_netlink()
            self._tasks = [
                spawn(self.reconciler.run(), name="reconciler"),
                spawn(self._sample_loop(), name="samples"),
                spawn(memory.trim_periodically(), name="malloc-trim"),
                spawn(self._resume(), name="resume"),
            ]
            log.info(
                "braidd ready: links %s",
                ", ".join(
                    f"{link.name} ({link.kind}, {link.priority})"
                    for link in self.reconciler.ordered()
                )
                or "none yet",
            )
            await self._stopping.wait()
        finally:
            await self._shutdown()

    def stop(self) -> None:
        self._stopping.set()

    def _start_app_groups(self) -> None:
        apps = AppGroups(self.config.cgroup, self.config.state_dir)
        try:
            apps.start()
        except (AppGroupsError, OSError) as exc:
            log.warning("braid direct and braid bonded are unavailable: %s", exc)
            return
        self.reconciler.apps = apps
        # Programs started with `braid bonded` before a restart are still there.
        self.reconciler.bonded_apps = bool(apps.members("bonded"))

    async def _shutdown(self) -> None:
        log.info("stopping: removing routes, rules and endpoints")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # The writer is stopped: the shutdown is the last change, made here. Connections get
        # CLOSE_GRACE to close cleanly, then are reset.
        closing = [
            spawn(self.reconciler.down(), name="stop-tunnels"),
            spawn(self.transparent_tcp.stop(), name="stop-transparent-tcp"),
            spawn(self.transparent_udp.stop(), name="stop-transparent-udp"),
            spawn(self.datagram.close(), name="stop-datagram"),
            spawn(self.dns.close(), name="stop-dns"),
            spawn(self.socks.stop(), name="stop-socks"),
        ]
        _, late = await asyncio.wait(closing, timeout=CLOSE_GRACE)
        if late:
            log.info(
                "stopping: resetting the connections that did not close within %g s", CLOSE_GRACE
            )
            for task in late:
                task.cancel()
        await asyncio.gather(*closing, return_exceptions=True)
        for writer in list(self._subscribers):
            writer.close()
        await self.control.stop()
        with contextlib.suppress(OSError):
            self.store.save_usage()
        await self.platform.stop()
        if self.reconciler.apps is not None:  # after the table that names them is gone
            self.reconciler.apps.stop()

    async def _resume(self) -> None:
        """Connect again to the server the user left Braid connected to (after a reboot), as
        soon as its name resolves; a user's up or down meanwhile wins."""
        pairing = read_saved_pairing(self.config.state_dir, to_resume=True)
        delay = RESUME_RETRY[0]
        while pairing is not None and self.reconciler.pairing is None:
            try:
                addresses = await self.platform.resolve(pairing.host, pairing.port)
            except OSError as exc:
                log.info("connecting to %s once its name resolves: %s", pairing.server, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESUME_RETRY[1])
                continue
            log.info("connecting again to %s, as left", pairing.server)
            await self.reconciler.submit(self.reconciler.resume, pairing, addresses)
            return

    # -- what wakes the reconciler --------------------------------------------

    def _watch_netlink(self) -> None:
        """Wake the reconciler on every link, address or route change the kernel announces."""
        loop = asyncio.get_running_loop()

        def watch() -> None:
            from pyroute2 import IPRoute

            groups = 0x1 | 0x10 | 0x40 | 0x100 | 0x400  # LINK, IPV4_IFADDR/ROUTE, IPV6_IFADDR/ROUTE
            try:
                with IPRoute() as ipr:
                    ipr.bind(groups=groups)
                    while not self._stopping.is_set():
                        if ipr.get():
                            loop.call_soon_threadsafe(self.reconciler.poke)
            except Exception as exc:  # the poll still covers us
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

    async def _sample_loop(self) -> None:
        """Once a second: rates, usage and health (a pass follows, which also polls links)."""
        last_save = time.monotonic()
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL)
            await self.spreading.shrink_idle()
            try:
                pool = self.reconciler.pool
                # The tunnels' subflows by local address: a kernel dump, so off the event loop.
                subflows = (
                    await asyncio.to_thread(
                        count_subflows, list(self.reconciler.server_addresses), pool.pairing.port
                    )
                    if pool
                    else {}
                )
                await self.reconciler.submit(self.reconciler.sample, subflows)
                if time.monotonic() - last_save > USAGE_SAVE_INTERVAL:
                    self.store.save_usage()
                    last_save = time.monotonic()
                self._publish({"event": "sample", **self.status(brief=True)})
            except Exception:
                log.exception("sampling failed")

    # -- the data path's view of the state ------------------------------------

    def _is_tunnel(self, remote: tuple[str, int]) -> bool:
        return self.reconciler.is_tunnel(remote)

    def _path_links(self):
        return self.reconciler.path_links()

    async def _take_control_tunnel(self) -> Tunnel:
        """A tunnel braidd keeps for itself (DNS relay, datagram session): never placed."""
        return await self._take_tunnel(control=True)

    async def _take_tunnel(self, control: bool = False) -> Tunnel:
        pool = self.reconciler.pool
        if pool is None:
            raise TunnelError("Braid is not connected (run: braid up)")
        tunnel = await pool.take()
        flow = self.spreading.adopt(tunnel.sock, tunnel.local[0], control=control)
        if flow is not None:
            tunnel.on_data = functools.partial(self.spreading.carried, flow)
        return tunnel

    def _udp_flows(self, take_tunnel, answer, **options) -> DatagramFlows:
        """UDP flows on the datagram path, or on tunnel connections (UdpSessions) as set."""
        return DatagramFlows(
            self.datagram, take_tunnel, answer, self.settings.__getitem__, **options
        )

    async def _carry_transparent(self, reader, writer, address: Address) -> None:
        if address.port == 53:
            await serve_dns_over_tcp(reader, writer, self.dns)
        else:
            await self.socks.carry(reader, writer, address)

    # -- status and subscribers -------------------------------------------------

    def saved_pairing(self) -> Pairing | None:
        return read_saved_pairing(self.config.state_dir)

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

    def status(self, brief: bool = False) -> dict[str, Any]:
        r = self.reconciler
        pool = r.pool
        links = r.links
        out = {
            "state": r.state(),
            "t": time.time(),
            "server": pool.pairing.server if pool else None,
            "fingerprint": pool.pairing.fingerprint if pool else None,
            "error": pool.last_error if pool else None,
            "connected_since": r.connected_since,
            "socks": self.socks.address,
            "best_link": r.best,
            "mode": self.settings["mode"],
            "capture": {
                "active": r.capture_active,
                "in_force": r.capture_in_force(),
                "when_server_unreachable": self.settings["when_server_unreachable"],
                "prefer_tcp_for_web": self.settings["prefer_tcp_for_web"],
                "udp_sessions": self.transparent_udp.sessions.count,
                "dns_queries": self.dns.queries,
                "dns_failures": self.dns.failures,
            },
            "links": [link.to_json() for link in r.ordered()],
            "tunnel": {
                "pool_ready": pool.ready_count if pool else 0,
                "flows_active": self.socks.active_flows,
                "flows_total": self.socks.flows_total,
                "flows_failed": self.socks.flows_failed,
                "bytes_up": self.socks.counters.up,
                "bytes_down": self.socks.counters.down,
                "rx_bps": sum(link.rx_bps for link in links.values() if link.carrying),
                "tx_bps": sum(link.tx_bps for link in links.values() if link.carrying),
                "paths": self.spreading.summary(),
            },
            "datagram": {
                **self.datagram.status(),
                "held": {name: rate * 8 for name, rate in r.held.items()},
            },
        }
        if not brief:
            out["events"] = list(r.events)[-20:]
            out["problems"] = self.store.problems + self.settings.problems
        return out


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


def cleanup(state_dir: Path, cgroup: str = DEFAULT_CGROUP) -> None:
    """Remove what a crashed run left: Braid's tables, rules, endpoints and nftables table,
    its empty cgroups, and restore the MPTCP limits."""
    routing = Routing(state_dir)
    try:
        routing.cleanup()
    finally:
        routing.close()
    PathManager(state_dir).restore()
    remove_capture_table()
    headroom.remove()
    apps = AppGroups(cgroup, state_dir)
    try:
        apps.start()  # finds (or mounts) the hierarchy; the groups are made if missing
    except (AppGroupsError, OSError) as exc:
        log.debug("no cgroups to remove: %s", exc)
        return
    apps.stop()
