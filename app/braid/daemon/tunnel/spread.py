"""Which links each tunnel connection uses: one to start, the others once they help.

A new flow starts on one link, the best healthy one (its pooled tunnel was opened from that
link's address). It spreads onto another link only once it has carried ``SPREAD_BYTES`` and has
been busy for ``SPREAD_RTTS`` round trips of that link. A join costs about one and a half round
trips of the new link before that link carries anything, so an answer shorter than that is over
before the join completes and never waits for the slow link; what the pool must not do is keep
joined subflows ready before the first byte (the kernel then spreads even a 30 KiB answer over
the slowest link). Measured (docs/ARCHITECTURE.md): joining once a flow has carried 16 KiB, with
no further wait, beat 32 KiB or 128 KiB and waiting one or two round trips of the new link, for
500 KiB and 4 MiB answers and for pages of many objects, and cost nothing for 1 to 120 KiB. Bulk
flows thus get every ``always`` link (and the ``backup`` links as backup subflows, ready for
failover); API calls and other flows under 16 KiB stay on their first link and cost no joins.

The decisions are pure functions (:func:`links_to_join`, :func:`plan`) over :class:`PathLink`
and :class:`Flow`; :class:`Spreading` keeps the open flows and carries the decisions out through
:class:`braid.daemon.routing.paths.PathManager` on braidd's netlink thread. When the links
change (one dies, comes back, changes priority) every open flow is reconciled: subflows on
links that may no longer carry are closed, a flow left with no usable subflow gets one on the
best link first, and bulk flows get the links that came back. A spread flow that goes quiet
keeps only its best subflow, and spreads afresh when busy again.

While other flows are busy (a page's connections), a new flow is *placed* instead: it gets a
subflow on the least loaded ``always`` link and its first subflow becomes backup, so the server
sends on the new link as soon as it is up; it keeps to that link while two or more others are
busy, and spreads as any flow once alone. Each connection then carries its objects over one
link's round trip instead of waiting for the slowest link's share of every object (measured in
docs/ARCHITECTURE.md). braidd's own long-lived tunnels (DNS, the datagram session) are never
placed and never count as busy.

The laptop's other MPTCP connections (not braidd's tunnels) get what the in-kernel path manager
would have given them: a subflow from every other usable link as soon as they are established.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from pyroute2.netlink.exceptions import NetlinkError

from braid.aio import spawn
from braid.daemon.routing import paths as pm

log = logging.getLogger(__name__)

#: A flow spreads only once it has carried this much (both directions together) ...
SPREAD_BYTES = int(os.environ.get("BRAID_SPREAD_BYTES", 16 << 10))
#: ... and has been carrying data for this many round trips of the link that would join.
#: (The environment variables are for the benchmarks that chose these values.)
SPREAD_RTTS = float(os.environ.get("BRAID_SPREAD_RTTS", 0.0))
#: The round trip assumed for a link the probes have not measured yet.
DEFAULT_RTT_MS = 100.0
#: How often a busy flow re-evaluates (seconds): bounds the cost per chunk relayed.
CHECK_INTERVAL = 0.01
#: How long the busy flows' view of the links is reused (seconds); link changes also renew it.
LINKS_TTL = 0.5
#: A spread flow idle this long (seconds) goes back to one subflow, and spreads afresh when busy
#: again: subflows that sat idle carry stale TCP timestamps, which freeze the receiver's window.
IDLE_SHRINK = 5.0
#: Placement: while other flows are busy (a page's connections), a new flow goes to the least
#: loaded link and stays there rather than spreading over every link.
PLACE = os.environ.get("BRAID_PLACE", "1") == "1"
#: A flow is busy if it carried a byte this recently (seconds), or was adopted this recently.
BUSY_WINDOW = 0.5
#: With this many other flows busy, a flow keeps to its link instead of spreading.
CROWD = 2


@dataclass(frozen=True)
class PathLink:
    """A link as path management sees it."""

    name: str
    ifindex: int
    addresses: tuple[str, ...]
    local_ids: tuple[int, int]  # MPTCP address ids for its IPv4 and IPv6 address
    backup: bool = False  # priority backup: joins as a backup subflow
    usable: bool = True  # up, allowed, and answering the probes
    rtt_ms: float | None = None  # from the probes, so under load

    def address(self, family: int) -> str | None:
        v6 = family == socket.AF_INET6
        return next((a for a in self.addresses if (":" in a) == v6), None)

    def local_id(self, family: int) -> int:
        return self.local_ids[1 if family == socket.AF_INET6 else 0]


@dataclass
class Flow:
    """One tunnel connection carrying a flow, and the links it has subflows on."""

    token: int
    sock: socket.socket
    remote: tuple[str, int]
    family: int
    links: set[str] = field(default_factory=set)
    #: Local address -> its MPTCP address id in this flow (0: the initial subflow's). Kept by
    #: address, not link: a link that went down is no longer in the list, and its subflows must
    #: still be withdrawn by id, which tells the server (RM_ADDR).
    ids: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    started: float | None = None  # when its first byte was carried (since it last idled)
    last: float = 0.0  # when it last carried a byte
    spread: bool = False  # it has been judged bulk: every usable link belongs in it
    next_check: float = 0.0
    backup: dict[str, bool] = field(default_factory=dict)  # link -> the flag its subflows got
    adopted: float = 0.0
    home: str | None = None  # the link it was placed on, while others were busy
    moved: bool = False  # placed away from its first link, whose subflow was made backup
    #: A tunnel braidd keeps for itself (the DNS relay's, the datagram session's): it follows
    #: the links like any flow, but is never placed and never counts as another busy flow.
    control: bool = False

    @property
    def open(self) -> bool:
        return self.sock.fileno() >= 0

    def busy(self, now: float) -> bool:
        if self.control:
            return False
        if self.bytes == 0 and self.last == 0.0:
            return now - self.adopted < BUSY_WINDOW
        return now - self.last < BUSY_WINDOW


def place(flow: Flow, links: list[PathLink], others: list[Flow]) -> PathLink | None:
    """The link a new flow should carry on while ``others`` are busy: the least loaded usable
    ``always`` link (ties: the best first); None when no link qualifies (pure)."""
    load: dict[str, float] = {}
    for other in others:
        if other.home is not None:
            load[other.home] = load.get(other.home, 0.0) + 1
        elif other.links:
            for name in other.links:
                load[name] = load.get(name, 0.0) + 1 / len(other.links)
    candidates = [
        link
        for link in links
        if link.usable and not link.backup and link.address(flow.family) is not None
    ]
    if not candidates:
        return None
    return min(candidates, key=lambda link: load.get(link.name, 0.0))


def links_to_join(flow: Flow, links: list[PathLink], now: float) -> list[PathLink]:
    """The links a busy flow should add now (pure)."""
    if flow.bytes < SPREAD_BYTES or flow.started is None:
        return []
    busy = now - flow.started
    out = []
    for link in links:
        if link.name in flow.links or not link.usable or link.address(flow.family) is None:
            continue
        rtt = (link.rtt_ms if link.rtt_ms is not None else DEFAULT_RTT_MS) / 1000
        if busy >= SPREAD_RTTS * rtt:
            out.append(link)
    return out


@dataclass
class Plan:
    """What reconciling one flow with the links asks for."""

    create: list[PathLink] = field(default_factory=list)
    #: Subflows to close, with the address id to withdraw (None: unknown, close it alone).
    destroy: list[tuple[pm.Subflow, int | None]] = field(default_factory=list)
    backup: list[tuple[pm.Subflow, bool]] = field(default_factory=list)


def plan(flow: Flow, subflows: list[pm.Subflow], links: list[PathLink]) -> tuple[Plan, set[str]]:
    """Reconcile one flow: its plan, and the links it will have subflows on (pure).

    ``links`` is in order of preference (the best first).
    """
    by_name = {link.name: link for link in links}
    by_address = {a: link for link in links for a in link.addresses}
    result = Plan()
    kept: dict[str, list[pm.Subflow]] = {}
    for sub in subflows:
        link = by_address.get(sub.local[0])
        if link is None or not link.usable:
            result.destroy.append((sub, flow.ids.get(sub.local[0])))
        else:
            kept.setdefault(link.name, []).append(sub)
    usable = [link for link in links if link.usable and link.address(flow.family)]
    carrying = [link for link in usable if link.name in kept and not link.backup]
    if not carrying:
        # Nothing left that may carry it: the best link first (an always link if any works).
        best = next((link for link in usable if not link.backup), None)
        best = best or next((link for link in usable if link.name not in kept), None)
        if best is not None and best.name not in kept:
            result.create.append(best)
    if flow.spread:
        result.create += [
            link for link in usable if link.name not in kept and link not in result.create
        ]
    for name, subs in kept.items():
        link = by_name[name]
        if flow.backup.get(name, False) != link.backup:
            result.backup += [(sub, link.backup) for sub in subs]
    will_have = set(kept) | {link.name for link in result.create}
    return result, will_have


class Spreading:
    """The open tunnel connections and their subflows, kept as the links and flows want."""

    def __init__(
        self,
        manager: pm.PathManager,
        links: Callable[[], list[PathLink]],
        run: Callable[..., Awaitable],
        own: Callable[[tuple[str, int]], bool] = lambda remote: False,
    ) -> None:
        self._pm = manager
        self._own = own  # is a connection to this remote end one of braidd's tunnels?
        self._all_links = links
        self._links_cache: tuple[float, list[PathLink]] = (-1e9, [])
        self._run = run  # runs a blocking call on braidd's netlink thread
        self._flows: dict[int, Flow] = {}
        self.joins = 0  # subflows added to flows, for the status and the tests
        self._reconciling = asyncio.Lock()

    @property
    def active(self) -> bool:
        return self._pm.active

    def _links(self, fresh: bool = False) -> list[PathLink]:
        """The links, best first; busy flows reuse one view for LINKS_TTL seconds."""
        now = time.monotonic()
        taken, links = self._links_cache
        if fresh or now - taken > LINKS_TTL:
            links = self._all_links()
            self._links_cache = (now, links)
        return links

    def summary(self) -> dict:
        """For ``braid status``: whether braidd manages the paths, and how many flows spread."""
        flows = self.flows()
        return {
            "per_flow": self._pm.active,
            "flows": len(flows),
            "spread": sum(1 for f in flows if f.spread),
            "joins": self.joins,
        }

    def flows(self) -> list[Flow]:
        self._prune()
        return list(self._flows.values())

    def _prune(self) -> None:
        for token in [t for t, f in self._flows.items() if not f.open]:
            del self._flows[token]

    def adopt(self, sock: socket.socket, local: str, control: bool = False) -> Flow | None:
        """Follow a tunnel connection that now carries a flow; None without path management.

        ``control``: one of braidd's own long-lived tunnels (see Flow.control)."""
        if not self._pm.active:
            return None
        token = pm.token(sock)
        if token is None:
            return None
        try:
            remote = sock.getpeername()
        except OSError:
            return None
        self._prune()
        family = socket.AF_INET6 if ":" in local else socket.AF_INET
        flow = Flow(token, sock, (pm.plain_address(remote[0]), remote[1]), family)
        flow.adopted = time.monotonic()
        flow.control = control
        links = self._links()
        start = next((link for link in links if local in link.addresses), None)
        if start is not None:
            flow.links.add(start.name)
            flow.ids[local] = 0  # the initial subflow's address id
            flow.backup[start.name] = False
        if PLACE and start is not None and not control:
            others = [f for f in self._flows.values() if f.open and f.busy(flow.adopted)]
            home = place(flow, links, others) if others else None
            if home is not None:
                flow.home = home.name
                if home.name != start.name:
                    flow.links.add(home.name)
                    spawn(self._move(flow, home, start), name=f"place-{home.name}")
        self._flows[token] = flow
        return flow

    def _move_to(self, flow: Flow, link: PathLink, start: PathLink) -> str:
        """On the netlink thread: a subflow on ``link``, and the initial one made backup, so
        the server sends on ``link`` as soon as its subflow is up (and until then, on the
        initial one)."""
        address = self._add(flow.token, link, flow.family, flow.remote)
        local = flow.sock.getsockname()
        initial = pm.Subflow(
            (pm.plain_address(local[0]), local[1]), (flow.remote[0], flow.remote[1])
        )
        self._pm.set_backup(flow.token, initial, True)
        return address

    async def _respread(self, flow: Flow) -> None:
        async with self._reconciling:
            view = _snapshot(flow)
            joins = await self._run(self._reconcile_one, view, self._links(fresh=True))
            flow.links, flow.ids, flow.backup = view.links, view.ids, view.backup
            self.joins += joins

    async def _move(self, flow: Flow, link: PathLink, start: PathLink) -> None:
        try:
            address = await self._run(self._move_to, flow, link, start)
        except (NetlinkError, OSError) as exc:
            flow.links.discard(link.name)
            flow.home = start.name
            if not (isinstance(exc, NetlinkError) and pm.gone(exc)):
                log.info("cannot place a flow on %s: %s", link.name, exc)
            return
        self.joins += 1
        flow.moved = True
        flow.ids[address] = link.local_id(flow.family)
        flow.backup[link.name] = link.backup
        flow.backup[start.name] = True

    def carried(self, flow: Flow, count: int) -> None:
        """The relay moved ``count`` bytes of ``flow`` (either direction)."""
        flow.bytes += count
        now = time.monotonic()
        flow.last = now
        if flow.started is None:
            flow.started = now
        if now < flow.next_check or flow.bytes < SPREAD_BYTES:
            return
        try:
            self._decide(flow, now)
        except Exception:
            # Path management must never break the flow it serves: stop deciding for this one.
            flow.next_check = float("inf")
            log.exception("path management failed for a flow; it keeps the links it has")

    def _decide(self, flow: Flow, now: float) -> None:
        flow.next_check = now + CHECK_INTERVAL
        if PLACE and flow.home is not None:
            crowd = sum(1 for f in self._flows.values() if f is not flow and f.open and f.busy(now))
            if crowd >= CROWD:
                return  # placed among busy flows: it keeps to its link
            if flow.moved:
                # Alone again: spread as any flow, the first link's subflow no longer backup.
                flow.home, flow.moved, flow.spread = None, False, True
                flow.next_check = float("inf")
                spawn(self._respread(flow), name="respread")
                return
        links = self._links()
        joining = links_to_join(flow, links, now)
        if not joining:
            return
        flow.spread = True
        for link in joining:
            flow.links.add(link.name)
            spawn(self._join(flow, link), name=f"join-{link.name}")
        if all(link.name in flow.links for link in links if link.usable):
            flow.next_check = float("inf")  # every link is in: nothing more to decide

    def _add(self, token: int, link: PathLink, family: int, remote: tuple[str, int]) -> str:
        """On the netlink thread: a subflow of connection ``token`` on ``link``; its address."""
        address = link.address(family)
        assert address is not None
        self._pm.create(token, address, link.local_id(family), link.ifindex, remote, link.backup)
        return address

    async def _join(self, flow: Flow, link: PathLink) -> None:
        try:
            address = await self._run(self._add, flow.token, link, flow.family, flow.remote)
        except NetlinkError as exc:
            flow.links.discard(link.name)
            if not pm.gone(exc):
                log.warning("cannot add %s to a flow: %s", link.name, exc)
            return
        self.joins += 1
        flow.ids[address] = link.local_id(flow.family)
        flow.backup[link.name] = link.backup

    async def reconcile(self) -> None:
        """The links changed: bring every open flow's subflows in line with them."""
        if not self._pm.active:
            return
        async with self._reconciling:
            links = self._links(fresh=True)
            for flow in self.flows():
                view = _snapshot(flow)
                joins = await self._run(self._reconcile_one, view, links)
                # Flow state changes here, on the event loop; the netlink thread saw copies.
                flow.links, flow.ids, flow.backup = view.links, view.ids, view.backup
                self.joins += joins
                if flow.spread:
                    flow.next_check = 0.0  # links may have come back: look again

    def established(self, event: pm.Established) -> None:
        """Another program's MPTCP connection is up: give it every other usable link, as the
        in-kernel path manager would have (braidd's own tunnels are managed per flow)."""
        if not self._pm.active or event.server_side or self._own(event.remote):
            return
        for link in self._links():
            address = link.address(event.family)
            if not link.usable or address is None or address == event.local[0]:
                continue
            spawn(self._join_foreign(event, link), name=f"join-foreign-{link.name}")

    async def _join_foreign(self, event: pm.Established, link: PathLink) -> None:
        try:
            await self._run(self._add, event.token, link, event.family, event.remote)
        except NetlinkError as exc:
            if not pm.gone(exc):
                log.info("cannot add %s to a connection to %s: %s", link.name, event.remote, exc)

    async def shrink_idle(self, now: float | None = None) -> None:
        """Spread flows that went quiet keep only their best subflow (see IDLE_SHRINK)."""
        if not self._pm.active:
            return
        now = time.monotonic() if now is None else now
        quiet = [f for f in self.flows() if f.spread and now - f.last > IDLE_SHRINK]
        if not quiet:
            return
        async with self._reconciling:
            links = self._links()
            for flow in quiet:
                kept = await self._run(self._shrink_one, _snapshot(flow), links)
                if kept is None or flow.last > now:
                    continue  # stalled rather than idle, or busy again meanwhile
                flow.spread = False
                flow.bytes = 0
                flow.started = None
                flow.next_check = 0.0
                flow.links = kept

    def _shrink_one(self, flow: Flow, links: list[PathLink]) -> set[str] | None:
        """On the netlink thread: close all but the best subflow; the links left, or None."""
        subflows = pm.subflows(flow.sock)
        by_address = {a: link for link in links for a in link.addresses}
        if pm.unacknowledged(flow.sock) or any(
            not (link := by_address.get(sub.local[0])) or not link.usable for sub in subflows
        ):
            return None  # stalled, not idle: a dead link is reconcile's to handle
        rank = {a: i for i, link in enumerate(links) for a in link.addresses}
        ranked = sorted(subflows, key=lambda sub: rank.get(sub.local[0], len(links)))
        if not ranked:
            return None
        try:
            for sub in ranked[1:]:
                self._pm.destroy(flow.token, sub)
        except NetlinkError as exc:
            if not pm.gone(exc):
                log.warning("cannot close an idle flow's subflow: %s", exc)
        kept = by_address.get(ranked[0].local[0])
        return {kept.name} if kept else set()

    def _reconcile_one(self, flow: Flow, links: list[PathLink]) -> int:
        """On the netlink thread, on copies: one flow's plan, carried out, new subflows before
        closing; returns how many subflows it added."""
        subflows = pm.subflows(flow.sock)
        if not subflows:
            return 0  # closed meanwhile, or not MPTCP
        todo, will_have = plan(flow, subflows, links)
        by_address = {a: link for link in links for a in link.addresses}
        joins = 0
        try:
            for link in todo.create:
                address = self._add(flow.token, link, flow.family, flow.remote)
                flow.backup[link.name] = link.backup
                flow.ids[address] = link.local_id(flow.family)
                joins += 1
            for sub, backup in todo.backup:
                self._pm.set_backup(flow.token, sub, backup)
                flow.backup[by_address[sub.local[0]].name] = backup
            for sub, local_id in todo.destroy:
                if local_id is None:
                    self._pm.destroy(flow.token, sub)
                else:
                    self._pm.remove(flow.token, local_id)
        except NetlinkError as exc:
            if not pm.gone(exc):
                log.warning("cannot adjust a flow's subflows: %s", exc)
        flow.links = will_have
        return joins


def _snapshot(flow: Flow) -> Flow:
    """A copy of ``flow`` whose sets and dicts the netlink thread may change."""
    return replace(flow, links=set(flow.links), ids=dict(flow.ids), backup=dict(flow.backup))


__all__ = ["Flow", "PathLink", "Plan", "Spreading", "links_to_join", "plan"]
