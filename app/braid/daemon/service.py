"""braidd: owns the links' routing, the tunnel pool, the SOCKS5 port and the control socket."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from braid.aio import spawn
from braid.daemon.control.server import Caller, ControlServer
from braid.daemon.links.model import Link, LinkState, Priority, default_priority
from braid.daemon.routing.policy import LinkRouting, Routing, prefixes_of
from braid.daemon.tunnel.pool import TunnelPool
from braid.daemon.tunnel.socks import SocksServer
from braid.protocol.control import ControlError, ErrorCode
from braid.protocol.pairing import Pairing, PairingError, parse_pairing
from braid.tunnel_client import Tunnel, TunnelError

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/var/lib/braid")
PAIRING_FILE = "pairing.json"
MONITOR_INTERVAL = 1.0
UP_WAIT = 12.0


@dataclass
class DaemonConfig:
    state_dir: Path = DEFAULT_STATE_DIR
    control_path: Path = Path("/run/braid/control.sock")
    socks: tuple[str, int] = ("127.0.0.1", 1080)
    links: list[tuple[str, str | None, Priority | None]] = field(default_factory=list)
    pool_size: int = 4


class State:
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DEGRADED = "degraded"


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.links: list[Link] = []
        for order, (name, kind, priority) in enumerate(config.links):
            kind = kind or "other"
            self.links.append(
                Link(
                    name=name,
                    kind=kind,
                    priority=priority or default_priority(kind),
                    order=order,
                    slot=order,
                )
            )
        # One worker thread: routing changes never interleave, and netlink calls never block the loop.
        self._netlink = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="netlink")
        self._routing: Routing | None = None
        self.pool: TunnelPool | None = None
        self.pairing: Pairing | None = None
        self.socks = SocksServer(config.socks, self._take_tunnel)
        self.control = ControlServer(
            config.control_path,
            {"status": self._cmd_status, "up": self._cmd_up, "down": self._cmd_down},
            changes={"up", "down"},
        )
        self._stopping = asyncio.Event()
        self._monitor_task: asyncio.Task | None = None
        self._counters: dict[str, tuple[float, int, int]] = {}
        self.connected_since: float | None = None

    # -- lifecycle ------------------------------------------------------------

    async def _in_netlink(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._netlink, fn, *args)

    async def run(self) -> None:
        self.config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._routing = await self._in_netlink(Routing, self.config.state_dir)
        # A previous run that crashed may have left tables, rules or endpoints behind.
        await self._in_netlink(self._routing.cleanup)
        await self._in_netlink(self._routing.raise_limits)
        try:
            await self.socks.start()
            await self.control.start()
            await self._refresh_links()
            self._monitor_task = spawn(self._monitor(), name="link-monitor")
            log.info(
                "braidd ready: links %s",
                ", ".join(f"{link.name} ({link.kind}, {link.priority})" for link in self.links)
                or "none",
            )
            await self._stopping.wait()
        finally:
            await self._shutdown()

    def stop(self) -> None:
        self._stopping.set()

    async def _shutdown(self) -> None:
        log.info("stopping: removing routes, rules and endpoints")
        if self._monitor_task is not None:
            self._monitor_task.cancel()
        await self._down()
        await self.control.stop()
        await self.socks.stop()
        if self._routing is not None:
            await self._in_netlink(self._routing.remove_all)
            await self._in_netlink(self._routing.close)
        self._netlink.shutdown(wait=True)

    # -- links ----------------------------------------------------------------

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(MONITOR_INTERVAL)
            try:
                await self._refresh_links()
            except Exception:
                log.exception("refreshing links failed")

    async def _refresh_links(self) -> None:
        assert self._routing is not None
        before = [(link.state, tuple(link.addresses)) for link in self.links]
        for link in self.links:
            view = await self._in_netlink(self._routing.view, link.name)
            if view is None:
                link.state = LinkState.MISSING
                link.addresses = []
            elif not (view.up and view.carrier):
                link.state = LinkState.DOWN
                link.addresses = []
            elif not (view.addresses4 or view.addresses6):
                link.state = LinkState.NO_ADDRESS
                link.addresses = []
            else:
                link.state = LinkState.UP
                link.addresses = [a for a, _ in view.addresses4 + view.addresses6]
            if link.state is LinkState.UP and link.priority is not Priority.NEVER:
                assert view is not None
                want = LinkRouting(
                    device=link.name,
                    ifindex=view.ifindex,
                    slot=link.slot,
                    addresses4=tuple(a for a, _ in view.addresses4),
                    addresses6=tuple(a for a, _ in view.addresses6),
                    prefixes4=prefixes_of(view.addresses4),
                    prefixes6=prefixes_of(view.addresses6),
                    gateway4=view.gateway4,
                    gateway6=view.gateway6,
                    backup=link.priority is Priority.BACKUP,
                )
                await self._in_netlink(self._routing.apply, want)
            else:
                await self._in_netlink(self._routing.remove, link.name)
        self._sample_counters()
        after = [(link.state, tuple(link.addresses)) for link in self.links]
        if before != after and self.pool is not None:
            self.pool.refresh()

    def _sample_counters(self) -> None:
        now = time.monotonic()
        counters = psutil.net_io_counters(pernic=True)
        for link in self.links:
            io = counters.get(link.name)
            if io is None:
                link.rx_bps = link.tx_bps = 0.0
                continue
            last = self._counters.get(link.name)
            if last is not None and now > last[0]:
                elapsed = now - last[0]
                link.rx_bps = max(0, io.bytes_recv - last[1]) * 8 / elapsed
                link.tx_bps = max(0, io.bytes_sent - last[2]) * 8 / elapsed
            link.rx_bytes, link.tx_bytes = io.bytes_recv, io.bytes_sent
            self._counters[link.name] = (now, io.bytes_recv, io.bytes_sent)

    def best_source(self, family: int) -> str | None:
        """The address the initial subflow leaves from: the first working link in order.

        ``always`` links come before ``backup`` ones; ``never`` links are not used.
        """
        for wanted in (Priority.ALWAYS, Priority.BACKUP):
            for link in sorted(self.links, key=lambda item: item.order):
                if link.priority is not wanted or link.state is not LinkState.UP:
                    continue
                for address in link.addresses:
                    if (":" in address) == (family == socket.AF_INET6):
                        return address
        return None

    # -- connection -----------------------------------------------------------

    async def _take_tunnel(self) -> Tunnel:
        if self.pool is None:
            raise TunnelError("Braid is not connected (run: braid up)")
        return await self.pool.take()

    def _pool_changed(self) -> None:
        if self.pool is not None and self.pool.connected and self.connected_since is None:
            self.connected_since = time.time()
            log.info("connected to %s", self.pool.pairing.server)
        elif self.pool is not None and not self.pool.connected:
            self.connected_since = None

    async def up(self, pairing: Pairing) -> dict[str, Any]:
        if self.pool is not None and self.pool.pairing == pairing and self.pool.connected:
            return self.status()
        await self._down()
        self.pairing = pairing
        self._save_pairing(pairing)
        self.pool = TunnelPool(
            pairing, self.best_source, self.config.pool_size, on_change=self._pool_changed
        )
        await self.pool.start()
        # Wait for the first connection so the caller learns at once about a wrong token.
        deadline = time.monotonic() + UP_WAIT
        while time.monotonic() < deadline and not (self.pool.connected or self.pool.fatal_error):
            await asyncio.sleep(0.05)
        if self.pool.fatal_error:
            message = self.pool.fatal_error
            await self._down()
            raise ControlError(ErrorCode.FAILED, message)
        return self.status()

    async def _down(self) -> None:
        pool, self.pool = self.pool, None
        self.connected_since = None
        if pool is not None:
            await pool.stop()
            log.info("disconnected")

    # -- state ----------------------------------------------------------------

    def state(self) -> str:
        if self.pool is None:
            return State.DISCONNECTED
        if not self.pool.connected:
            return State.CONNECTING
        usable = [link for link in self.links if link.priority is not Priority.NEVER]
        if any(link.state is not LinkState.UP for link in usable):
            return State.DEGRADED
        return State.CONNECTED

    def status(self) -> dict[str, Any]:
        pool = self.pool
        return {
            "state": self.state(),
            "server": pool.pairing.server if pool else None,
            "fingerprint": pool.pairing.fingerprint if pool else None,
            "error": pool.last_error if pool else None,
            "connected_since": self.connected_since,
            "socks": self.socks.address,
            "links": [link.to_json() for link in sorted(self.links, key=lambda i: i.order)],
            "tunnel": {
                "pool_ready": pool.ready_count if pool else 0,
                "flows_active": self.socks.active_flows,
                "flows_total": self.socks.flows_total,
                "flows_failed": self.socks.flows_failed,
                "bytes_up": self.socks.counters.up,
                "bytes_down": self.socks.counters.down,
            },
        }

    # -- pairing storage ------------------------------------------------------

    def _save_pairing(self, pairing: Pairing) -> None:
        path = self.config.state_dir / PAIRING_FILE
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({"uri": pairing.uri()}, out)
        os.replace(tmp, path)

    def saved_pairing(self) -> Pairing | None:
        path = self.config.state_dir / PAIRING_FILE
        try:
            return parse_pairing(json.loads(path.read_text())["uri"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, PairingError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            return None

    # -- control commands -----------------------------------------------------

    async def _cmd_status(self, caller: Caller, request: dict) -> dict:
        return self.status()

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
                    "Braid is not paired with a server yet: run  braid up --pairing 'braid://…'  "
                    "with the URI that braid-server init printed",
                )
        log.info("up requested by %s (server %s)", caller.describe(), pairing.server)
        return await self.up(pairing)

    async def _cmd_down(self, caller: Caller, request: dict) -> dict:
        log.info("down requested by %s", caller.describe())
        await self._down()
        return self.status()


def run_daemon(config: DaemonConfig) -> int:
    """Run in the foreground until SIGTERM or SIGINT; returns the exit code."""
    import signal

    daemon = Daemon(config)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.stop)
        await daemon.run()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0


def cleanup(state_dir: Path) -> None:
    """Remove what a crashed run left: Braid's tables, rules and endpoints, and restore limits."""
    routing = Routing(state_dir)
    try:
        routing.cleanup()
    finally:
        routing.close()
