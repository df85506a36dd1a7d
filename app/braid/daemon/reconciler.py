"""The one writer of braidd's state: links, routing, the tunnel pool, the probes and capture.

A single task drains a queue of triggers — netlink events and the link poll, probe verdicts,
the pool's news, the sample timer, and control requests that change state — and after each
one observes (through the platform), decides (:func:`braid.daemon.policy.decide`, pure) and
applies the difference. Nothing else changes that state, so two requests never interleave: a
``down`` arriving while an ``up`` waits for its first tunnel is queued behind the ``up``'s
change, a routing apply can never be stale, and starting the probes twice cannot happen.
Slow work that changes nothing (resolving the server's name, waiting for the first tunnel)
happens outside the writer, so a pass is never held up by it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from braid.aio import spawn
from braid.daemon import policy
from braid.daemon.links.model import Link, Priority
from braid.daemon.links.store import LinkStore
from braid.daemon.platform import PlatformBase
from braid.daemon.routing import capture, headroom
from braid.daemon.routing.apps import AppGroups
from braid.daemon.routing.capture import OWN_MARK
from braid.daemon.routing.headroom import HeadroomError
from braid.daemon.routing.paths import plain_address
from braid.daemon.settings import Settings
from braid.daemon.tunnel.spread import PathLink, Spreading
from braid.files import write_json
from braid.protocol.control import ControlError, ErrorCode
from braid.protocol.events import Event, EventKind
from braid.protocol.pairing import Pairing
from braid.units import format_rate

log = logging.getLogger(__name__)
#: A link carrying less than this (bits per second, both ways) is quiet: its round trip is
#: its floor's to learn.
QUIET_BPS = 200_000
#: Every this many samples (seconds), braidd checks that its nftables tables are still there.
TABLES_CHECK_EVERY = 5
#: A firewall that reloads again and again is said at most this often (seconds).
TABLES_WARN_INTERVAL = 60.0

T = TypeVar("T")

PAIRING_FILE = "pairing.json"
EVENTS_KEPT = 50


@dataclass(frozen=True)
class Parts:
    """How the reconciler makes its I/O components (the tests pass fakes)."""

    make_pool: Callable[..., Any]
    make_prober: Callable[..., Any] | None


def real_parts() -> Parts:
    from braid.daemon.tunnel.pool import TunnelPool

    try:
        from braid.daemon.links.health import Prober
    except ImportError as exc:  # pragma: no cover - only without the probe's dependencies
        log.warning("health probes unavailable: %s", exc)
        return Parts(TunnelPool, None)
    return Parts(TunnelPool, Prober)


class Reconciler:
    def __init__(
        self,
        platform: PlatformBase,
        store: LinkStore,
        settings: Settings,
        state_dir,
        named: dict[str, policy.Named],
        discover: bool | None,
        spreading: Spreading,
        parts: Parts,
        publish: Callable[[dict], None] = lambda message: None,
        capture_ports: Callable[[], tuple[int, int]] = lambda: (0, 0),
        call_links: Callable[[], set[str]] = set,
    ) -> None:
        self.platform = platform
        self.store = store
        self.settings = settings
        self._state_dir = state_dir
        self._named = named
        self._discover_flag = discover
        self.spreading = spreading
        self._parts = parts
        self._publish = publish
        self._capture_ports = capture_ports
        self._call_links = call_links  # the links real-time flows use now
        # The state; only the writer task changes it.
        self.links: dict[str, Link] = {}
        self.best: str | None = None
        self.pool: Any = None
        self.prober: Any = None
        self.pairing: Pairing | None = None
        self.server_addresses: list[str] = []
        self.connected_since: float | None = None
        self.capture_active = False
        self._capture_plan: capture.CapturePlan | None = None
        #: Braid's cgroups for `braid direct` and `braid bonded` (None: not available).
        self.apps: AppGroups | None = None
        self.bonded_apps = False  # a program was started with `braid bonded`
        self._alive: dict[str, bool] = {}
        self._probe_family: int | None = None
        self._probing: dict[str, str] = {}
        self._counters: dict[str, tuple[float, int, int]] = {}
        #: The fastest download each link has shown (bits/s), each link's limit for headroom
        #: (bytes/s), and the links calls use, held to it.
        self.peaks: dict[str, float] = {}
        self.floors: dict[str, float | None] = {}  # each link's round trip without a queue
        self._queues: set[str] = set()  # links whose round trip shows a queue now
        self.limits: dict[str, int] = {}
        self.gated: set[str] = set()
        self._headroom_failed = False
        self._headroom_known = False  # the table is as self.limits says
        #: How often Braid's nftables tables were found removed from outside and put back.
        self.tables_restored = 0
        self._tables_warned = -1e9
        self._headroom_lost = False  # removed from outside: write it again though unchanged
        self._samples = 0
        self._headroom_percent: int | None = None
        self._path_signature: tuple = ()
        self.events: collections.deque[dict] = collections.deque(maxlen=EVENTS_KEPT)
        self.passes = 0
        self._queue: asyncio.Queue = asyncio.Queue()
        self._poked = False

    # -- triggers ---------------------------------------------------------------

    def poke(self) -> None:
        """Something may have changed (links, probes, the pool): a pass soon, coalesced."""
        if not self._poked:
            self._poked = True
            self._queue.put_nowait(None)

    async def submit(self, change: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``change`` as the writer, between passes, followed by a pass; its result."""
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((change, args, future))
        return await future

    def on_health(self, name: str, alive: bool) -> None:
        """A probe verdict (from the prober, on the event loop)."""
        if self._alive.get(name) is not alive:
            self._alive[name] = alive
            self.poke()

    async def run(self) -> None:
        """The writer: one trigger at a time, each followed by a pass, until cancelled."""
        try:
            await self._serve()
        finally:
            # Stopping: whoever still waits for a change hears so at once, never hangs.
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if item is not None and not item[2].done():
                    item[2].set_exception(ControlError(ErrorCode.FAILED, "braidd is stopping"))
            if self._current is not None and not self._current.done():
                self._current.set_exception(ControlError(ErrorCode.FAILED, "braidd is stopping"))

    _current: asyncio.Future | None = None

    async def _serve(self) -> None:
        while True:
            item = await self._queue.get()
            future = None
            if item is None:
                self._poked = False
            else:
                change, args, future = item
                if future.cancelled():
                    continue
                self._current = future
                try:
                    result = await change(*args)
                except Exception as exc:
                    future.set_exception(exc)
                    future = None
            try:
                await self.reconcile()
            except Exception:
                log.exception("reconciling links failed")
            # The caller hears back once its change is applied, not merely recorded.
            if future is not None and not future.cancelled():
                future.set_result(result)

    # -- one pass ---------------------------------------------------------------

    async def reconcile(self) -> None:
        """Observe, decide, apply. Only ever called by the writer."""
        self.passes += 1
        discover = self._discover_flag
        if discover is None:
            discover = self.settings["discover_links"]
        discovered = await self.platform.discover() if discover else {}
        added = tuple(self.store.added())
        names = policy.wanted_names(self._named, discovered, added)
        views = await self.platform.views(names)
        inputs = policy.Inputs(
            named=self._named,
            discovered=discovered,
            added=added,
            choices={name: self.store.choice(name) for name in names},
            views=views,
            alive=dict(self._alive),
            used={name: self.store.used(name) for name in names},
            probe_family=self._probe_family if self.prober is not None else None,
            connectivity=await self.platform.connectivity(),
        )
        connected = self.pool.connected if self.pool is not None else None
        decision = policy.decide(self.links, inputs, self.best, connected)
        await self.platform.apply(decision.routing, decision.withdrawn)
        self.links = decision.links
        self._alive = {n: a for n, a in self._alive.items() if n in decision.probe}
        self._sync_probes(decision.probe)
        for event in decision.events:
            self.event(event)
            if event.kind is EventKind.CAP_REACHED:
                with contextlib.suppress(OSError):
                    self.store.save_usage()
        if decision.best != self.best:
            self.best = decision.best
            if self.pool is not None:
                self.pool.refresh()
        self._connection_events()
        self._reconcile_paths()
        await self._update_capture()
        await self._hold_for_calls()

    def _sync_probes(self, want: dict[str, str]) -> None:
        if self.prober is None:
            self._probing = {}
            return
        for name in set(self._probing) - set(want):
            self.prober.remove_link(name)
        for name, source in want.items():
            if self._probing.get(name) != source:
                self.prober.set_link(name, name, source)
        self._probing = dict(want)

    def _connection_events(self) -> None:
        pool = self.pool
        if pool is None:
            return
        events = policy.connection_events(
            pool.connected, self.connected_since is not None, pool.pairing.server, pool.last_error
        )
        for event in events:
            self.connected_since = time.time() if event.kind is EventKind.CONNECTED else None
            self.event(event)

    # -- events -------------------------------------------------------------------

    def event(self, event: Event) -> None:
        message = event.to_json(time.time())
        self.events.append(message)
        log.log(
            logging.WARNING if event.kind.level != "info" else logging.INFO, "%s", event.message
        )
        self._publish(message)

    # -- queries (any task may call these: they read, never write) ------------------

    def ordered(self) -> list[Link]:
        return policy.ordered(self.links)

    def best_link(self, family: int | None = None) -> Link | None:
        return policy.best_link(self.links, family)

    def best_source(self, family: int) -> str | None:
        return policy.source_address(self.best_link(family), family)

    def state(self) -> str:
        # What the last pass saw, so that the state and its event ("connected", "lost the
        # server") always agree in a status answer.
        connected = self.pool is not None and self.connected_since is not None
        return policy.daemon_state(self.pool is not None, connected, self.links)

    def capture_in_force(self) -> str:
        return policy.capture_in_force(
            self.settings["mode"],
            self.pool is not None,
            self.pool is not None and self.connected_since is not None,  # as state() says
            self.settings["when_server_unreachable"],
        )

    def is_tunnel(self, remote: tuple[str, int]) -> bool:
        """Is a connection to ``remote`` one of braidd's tunnels to the paired server?"""
        return (
            self.pairing is not None
            and remote[1] == self.pairing.port
            and remote[0] in {plain_address(a) for a in self.server_addresses}
        )

    def datagram_server(self) -> tuple[str, int] | None:
        """Where the datagram path goes: the server's UDP port, while a pool is up."""
        if self.pool is None or self.pairing is None or not self.server_addresses:
            return None
        return (self.server_addresses[0], self.pairing.port)

    def datagram_links(self) -> list[tuple[str, str, bool, Any]]:
        """The probed links for the datagram path: (name, source, backup, probe health)."""
        out = []
        for name, source in self._probing.items():
            link = self.links.get(name)
            if link is None or (link.effective or link.priority) is Priority.NEVER:
                continue
            health = None
            if self.prober is not None:
                with contextlib.suppress(KeyError):
                    health = self.prober.health(name)
            out.append((name, source, (link.effective or link.priority) is Priority.BACKUP, health))
        return out

    # -- path management ------------------------------------------------------------

    def path_links(self) -> list[PathLink]:
        """The links as path management sees them, best first (see best_link)."""
        applied = self.platform.applied()
        out = []
        for wanted in (Priority.ALWAYS, Priority.BACKUP):
            for link in self.ordered():
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
            (p.name, p.ifindex, p.addresses, p.backup, p.usable) for p in self.path_links()
        )
        if signature != self._path_signature:
            self._path_signature = signature
            spawn(self.spreading.reconcile(), name="reconcile-paths")

    # -- capture --------------------------------------------------------------------

    async def _update_capture(self) -> None:
        want = self.capture_in_force() in ("tunnel", "blocked")
        # Proxy mode: programs started with `braid bonded` still have their TCP redirected.
        bonded = not want and self.bonded_apps and self.pool is not None
        if not want and self.capture_active:
            self.capture_active = False
            self.event(Event(EventKind.CAPTURE_OFF, None, "system-wide capture off"))
        if not want and not bonded:
            if self._capture_plan is not None:
                await self.platform.capture(None)
                self._capture_plan = None
            return
        plan = policy.capture_plan(
            self._capture_ports(),
            self.server_addresses,
            self.links,
            self.settings["bypass"],
            self.settings["prefer_tcp_for_web"],
            apps=self.apps,
            scope="all" if want else "bonded",
        )
        if plan == self._capture_plan and (self.capture_active or not want):
            return
        try:
            await self.platform.capture(plan)
        except (capture.CaptureError, OSError) as exc:
            log.error("system-wide capture failed: %s", exc)
            self.event(
                Event(EventKind.CAPTURE_FAILED, None, f"system-wide mode could not start: {exc}")
            )
            return
        self._capture_plan = plan
        if not self.capture_active:
            self.capture_active = True
            self.event(
                Event(
                    EventKind.CAPTURE_ON, None, "system-wide capture on: all traffic through Braid"
                )
            )

    # -- changes (run by the writer through submit) ------------------------------------

    async def up(self, pairing: Pairing, addresses: list[str]) -> Any:
        """Connect with ``pairing`` to the server at ``addresses``; the pool now in use."""
        if (
            self.pool is not None
            and self.pool.pairing == pairing
            and self.pool.connected
            and addresses == self.server_addresses
        ):
            return self.pool
        await self.down()
        self.pairing = pairing
        self.server_addresses = addresses
        # "connect": braidd connects again by itself when it starts (after a reboot, say).
        write_json(self._state_dir / PAIRING_FILE, {"uri": pairing.uri(), "connect": True})
        pool = self._parts.make_pool(
            pairing,
            self.best_source,
            self.settings["pool_size"],
            on_change=self.poke,
            addresses=addresses,
            mark=OWN_MARK,
        )
        self.pool = pool
        await pool.start()
        await self._start_prober(pairing, addresses)
        return pool

    async def down(self, only: Any = None) -> None:
        """Disconnect (``only``: only if that pool is still the one in use)."""
        if only is not None and self.pool is not only:
            return
        pool, self.pool = self.pool, None
        self.connected_since = None
        await self._stop_prober()
        await self._update_capture()
        await self._hold_for_calls()
        if pool is not None:
            await pool.stop()
            self.event(Event(EventKind.DISCONNECTED, None, "disconnected"))

    async def disconnect(self) -> None:
        """The user's ``down``: disconnect, and stay so when braidd starts again."""
        await self.down()
        if self.pairing is not None:
            write_json(
                self._state_dir / PAIRING_FILE, {"uri": self.pairing.uri(), "connect": False}
            )

    async def resume(self, pairing: Pairing, addresses: list[str]) -> None:
        """Connect as the user last asked, unless they have said anything since braidd started."""
        if self.pairing is None:
            await self.up(pairing, addresses)

    async def _start_prober(self, pairing: Pairing, addresses: list[str]) -> None:
        await self._stop_prober()  # never two: the old one's sockets would leak
        if self._parts.make_prober is None or not addresses:
            return
        address = addresses[0]
        key = bytes.fromhex(hashlib.sha256(pairing.token.encode()).hexdigest())
        self._probe_family = socket.AF_INET6 if ":" in address else socket.AF_INET
        prober = self._parts.make_prober(
            key,
            (address, pairing.port),
            on_change=self.on_health,
            interval=self.settings["probe_interval_ms"] / 1000,
            mark=OWN_MARK,
        )
        await prober.start()
        self.prober = prober

    async def _stop_prober(self) -> None:
        prober, self.prober = self.prober, None
        self._probe_family = None
        self._probing = {}
        self._alive = {}
        if prober is not None:
            await prober.stop()

    async def apply_settings(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Settings changed (already saved): apply them to what runs now."""
        if "pool_size" in changes and self.pool is not None:
            self.pool.resize(self.settings["pool_size"])
        if "probe_interval_ms" in changes and self.prober is not None:
            self.prober.interval = self.settings["probe_interval_ms"] / 1000
        self.event(
            Event(
                EventKind.SETTINGS_CHANGED, None, f"settings changed: {', '.join(sorted(changes))}"
            )
        )
        return dict(self.settings.values)

    async def nothing(self) -> None:
        """A change that changes nothing: the pass after it re-reads choices and links."""

    # -- samples ----------------------------------------------------------------------

    async def sample(self, subflows: dict[str, int]) -> None:
        """Per-link rates, usage and health, once a second (run by the writer)."""
        now = time.monotonic()
        counters = await self.platform.counters()
        crossed = False
        links = {}
        queues: set[str] = set()
        for name, link in self.links.items():
            link = replace(link, subflows=sum(subflows.get(a, 0) for a in link.addresses))
            if self.prober is not None and name in self._probing:
                with contextlib.suppress(KeyError):
                    link.health = self.prober.health(name).to_json()
            io = counters.get(name)
            if io is None:
                link.rx_bps = link.tx_bps = 0.0
                links[name] = link
                continue
            last = self._counters.get(name)
            if last is not None and now > last[0]:
                elapsed = now - last[0]
                rx = max(0, io[0] - last[1])
                tx = max(0, io[1] - last[2])
                link.rx_bps = rx * 8 / elapsed
                link.tx_bps = tx * 8 / elapsed
                self.store.count(name, rx + tx)
                used = self.store.used(name)
                # The cap is the policy's to judge; a crossing only asks for a pass.
                crossed = crossed or policy.metered_use(link, used).capped != link.capped
                link.used_bytes = used
                rtt = (link.health or {}).get("rtt_ms")
                quiet = link.rx_bps + link.tx_bps < QUIET_BPS
                self.floors[name] = policy.rtt_floor(self.floors.get(name), rtt, elapsed, quiet)
                queue = policy.queued(rtt, self.floors[name])
                if queue:
                    queues.add(name)
                self.peaks[name] = policy.link_peak(
                    self.peaks.get(name, 0.0),
                    link.rx_bps,
                    link.tx_bps,
                    elapsed,
                    name in self.gated,
                    queue,
                )
            link.rx_bytes, link.tx_bytes = io
            self._counters[name] = (now, io[0], io[1])
            links[name] = link
        self.links = links
        for gone in (set(self.peaks) | set(self.floors)) - set(links):
            self.peaks.pop(gone, None)
            self.floors.pop(gone, None)
        self._queues = queues
        await self._hold_for_calls()
        self._samples += 1
        if self._samples % TABLES_CHECK_EVERY == 0:
            await self.check_tables()
        if crossed:
            self.poke()

    async def check_tables(self) -> None:
        """Put back Braid's nftables tables if something outside removed them: a firewall
        reload (``nft -f /etc/nftables.conf`` begins with ``flush ruleset``) would otherwise turn
        capture (system-wide, or for ``braid bonded`` programs) and headroom for calls off until
        the next change of plan. Run by the writer, from every TABLES_CHECK_EVERY-th sample."""
        expected = set()
        if self._capture_plan is not None:
            expected.add(f"inet {capture.TABLE}")
        if self._headroom_known and self.limits:
            expected.add(f"inet {headroom.TABLE}")
        if not expected:
            return
        present = await self.platform.nft_tables()
        if present is None:
            return
        gone = expected - present
        if not gone:
            return
        self.tables_restored += 1
        now = time.monotonic()
        if now - self._tables_warned >= TABLES_WARN_INTERVAL:
            self._tables_warned = now
            log.warning(
                "nftables table %s removed from outside (a firewall reload?); putting it back "
                "(%d time(s) since braidd started)",
                ", ".join(sorted(gone)),
                self.tables_restored,
            )
        if f"inet {capture.TABLE}" in gone:
            self._capture_plan = None  # the next pass installs the plan again, whole
        if f"inet {headroom.TABLE}" in gone:
            self._headroom_known = False  # the next pass writes it again, whole
            self._headroom_lost = True
        self.poke()

    @property
    def held(self) -> dict[str, int]:
        """The links held for calls now, with their limits (bytes per second)."""
        return {name: self.limits[name] for name in sorted(self.gated)}

    async def _hold_for_calls(self) -> None:
        """Headroom for calls (routing/headroom.py): limits while connected, held where calls
        are."""
        connected = self.pool is not None and self.pairing is not None
        calls = self._call_links() if connected else set()
        percent = self.settings["call_headroom"]
        limits, gated = policy.headroom(
            calls,
            self.peaks if connected else {},
            percent,
            # A changed setting takes effect whole (the tenth's tolerance is for the rates).
            self.limits if percent == self._headroom_percent else {},
            self._queues,
            self.gated,
        )
        self._headroom_percent = percent
        if limits == self.limits and gated == self.gated and not self._headroom_lost:
            return
        self._headroom_lost = False  # one try; a failure below is said and retried on change
        servers = [plain_address(a) for a in self.server_addresses]
        port = self.pairing.port if self.pairing else 0
        before = self.limits if self._headroom_known else None
        try:
            await self.platform.headroom(before, limits, gated, servers, port)
        except HeadroomError as exc:
            self._headroom_known = False  # the table is whatever nft left: write it whole
            if not self._headroom_failed:
                log.warning("%s", exc)
            self._headroom_failed = True
            return
        if self._headroom_failed:
            log.info("headroom for calls works again")
        self._headroom_failed = False
        for name in sorted(gated - self.gated):
            rate = format_rate(limits[name] * 8)
            log.info("a call uses %s: downloads through Braid on it held under %s", name, rate)
        for name in sorted(self.gated - gated):
            log.info("no call uses %s any more: its downloads are free", name)
        self.limits, self.gated = limits, gated
        self._headroom_known = True


__all__ = ["PAIRING_FILE", "Parts", "Reconciler", "real_parts"]
