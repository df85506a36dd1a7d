"""braidd's link policy: from what was observed and what the user chose, to what should be.

Everything here is a pure function of its arguments: no I/O, no asyncio, no clock. The
reconciler (:mod:`braid.daemon.reconciler`) gathers the inputs — the kernel's view of each
device, what discovery found, the probes' verdicts, the data used, the user's choices and
settings — calls :func:`decide`, and carries the :class:`Decision` out through the platform.
So every rule (priorities, order, caps, health, the best link, capture, events) is tested in
milliseconds without root, and a race is a sequence of inputs (tests/daemon/test_policy.py).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from braid.daemon.links.model import Link, LinkState, Priority, default_priority
from braid.daemon.links.store import LinkChoice
from braid.daemon.routing import capture
from braid.daemon.routing.apps import AppGroups
from braid.daemon.routing.policy import SLOTS, DeviceView, LinkRouting, prefixes_of
from braid.protocol.events import Event, EventKind


class State:
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DEGRADED = "degraded"


@dataclass(frozen=True)
class Named:
    """An interface named on braidd's command line (``--link IFACE[:KIND[:PRIORITY]]``)."""

    kind: str | None
    priority: Priority | None
    index: int


@dataclass(frozen=True)
class Inputs:
    """Everything one pass of the policy looks at."""

    named: Mapping[str, Named] = field(default_factory=dict)
    #: Interfaces discovery found to be links: name -> (kind, metered guess).
    discovered: Mapping[str, tuple[str, bool | None]] = field(default_factory=dict)
    choices: Mapping[str, LinkChoice] = field(default_factory=dict)
    views: Mapping[str, DeviceView | None] = field(default_factory=dict)
    #: Interfaces the user made links (braid links add), kept while unplugged.
    added: tuple[str, ...] = ()
    #: The probes' verdicts (absent: not probed, or no verdict yet).
    alive: Mapping[str, bool] = field(default_factory=dict)
    used: Mapping[str, int] = field(default_factory=dict)  # bytes used this billing period
    #: The address family the probes use (None: no probes running).
    probe_family: int | None = None
    #: NetworkManager's connectivity per device it checked ("portal": sign-in required).
    connectivity: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Decision:
    links: dict[str, Link]
    #: Per link, the routing it should have (None: none at all).
    routing: dict[str, LinkRouting | None]
    #: Links whose routing stays but whose endpoint is withdrawn: they are dead.
    withdrawn: set[str]
    #: Links to probe, with the source address to probe from.
    probe: dict[str, str]
    best: str | None
    events: list[Event]


def wanted_names(
    named: Mapping[str, Named], discovered: Mapping[str, object], added: tuple[str, ...] = ()
) -> list[str]:
    """The interfaces that are links: those named first, then those the user added, then
    discovery's, sorted."""
    out = list(named)
    out += [name for name in added if name not in out]
    return out + sorted(name for name in discovered if name not in out)


def choose(
    link: Link,
    choice: LinkChoice,
    named: Named | None,
    discovered: tuple[str, bool | None] | None,
    added: bool = False,
) -> Link:
    """Apply the user's choices: stored choices win over --link, which wins over discovery."""
    kind = choice.kind or (named.kind if named and named.kind else None)
    kind = kind or (discovered[0] if discovered else None) or link.kind
    priority = choice.priority or (named.priority if named else None) or default_priority(kind)
    if choice.order is not None:
        order = choice.order
    elif named is not None:
        order = named.index
    else:
        order = 100 + link.slot
    guessed = discovered[1] if discovered else None
    if choice.metered is not None:
        metered = choice.metered
    elif guessed is not None:
        metered = guessed
    else:
        metered = kind == "cellular"
    return replace(
        link,
        kind=kind,
        priority=priority,
        order=order,
        metered=metered,
        cap=choice.cap.to_json() if choice.cap else None,
        configured=named is not None or added,
        added=added,
    )


def observe(link: Link, view: DeviceView | None) -> Link:
    """The link's state and addresses from the kernel's view of its device."""
    if view is None:
        return replace(link, state=LinkState.MISSING, addresses=[])
    if not (view.up and view.carrier):
        return replace(link, state=LinkState.DOWN, addresses=[])
    if not (view.addresses4 or view.addresses6):
        return replace(link, state=LinkState.NO_ADDRESS, addresses=[])
    return replace(
        link,
        state=LinkState.UP,
        addresses=[a for a, _ in view.addresses4 + view.addresses6],
        subnets=list(prefixes_of(view.addresses4) + prefixes_of(view.addresses6)),
        # Keep the last gateway seen: a flap flushes the default route before it returns.
        gateway4=view.gateway4 or link.gateway4,
        gateway6=view.gateway6 or link.gateway6,
    )


def metered_use(link: Link, used: int) -> Link:
    """The data used, whether the cap is reached, and the priority in effect."""
    capped = bool(link.cap) and used >= link.cap["limit_bytes"]
    effective = Priority(link.cap["then"]) if capped and link.cap else link.priority
    return replace(link, used_bytes=used, capped=capped, effective=effective)


def may_carry(link: Link) -> bool:
    """Up, allowed to carry, and not held by a captive portal (it cannot reach the server)."""
    return (
        link.state is LinkState.UP
        and link.effective is not Priority.NEVER
        and not link.sign_in_required
    )


def routing_for(link: Link, view: DeviceView | None) -> LinkRouting | None:
    """The routing an up link that may carry traffic should have; None for any other."""
    if not may_carry(link) or view is None:
        return None
    return LinkRouting(
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


def ordered(links: Mapping[str, Link]) -> list[Link]:
    return sorted(links.values(), key=lambda link: (link.order, link.name))


def best_link(links: Mapping[str, Link], family: int | None = None) -> Link | None:
    """The link new connections start on: ``always`` before ``backup``, then the order."""
    for wanted in (Priority.ALWAYS, Priority.BACKUP):
        for link in ordered(links):
            if link.effective is not wanted or not link.usable:
                continue
            if family is None or any(
                (":" in a) == (family == socket.AF_INET6) for a in link.addresses
            ):
                return link
    return None


def source_address(link: Link | None, family: int) -> str | None:
    if link is None:
        return None
    return next((a for a in link.addresses if (":" in a) == (family == socket.AF_INET6)), None)


def link_events(before: Link | None, after: Link | None) -> list[Event]:
    """What changed for one link that the user hears about."""
    if after is None:
        assert before is not None
        return [Event(EventKind.LINK_REMOVED, before.name, f"{before.name} is gone")]
    out = []
    if before is None and not after.configured:
        out.append(Event(EventKind.LINK_FOUND, after.name, f"found {after.name} ({after.kind})"))
    was = before.state if before is not None else LinkState.MISSING
    if was is not after.state:
        if after.state is LinkState.UP:
            out.append(Event(EventKind.LINK_UP, after.name, f"{after.name} is up"))
        elif was is LinkState.UP:
            out.append(Event(EventKind.LINK_DOWN, after.name, f"{after.name} is {after.state}"))
    if after.sign_in_required and not (before is not None and before.sign_in_required):
        out.append(
            Event(
                EventKind.SIGN_IN_REQUIRED,
                after.name,
                f"{after.name} needs you to sign in (a captive portal): open any web page in a "
                "browser to sign in; Braid uses it once it reaches the internet",
            )
        )
    elif (
        before is not None
        and before.sign_in_required
        and not after.sign_in_required
        and after.state is LinkState.UP
    ):
        out.append(
            Event(EventKind.LINK_BACK, after.name, f"{after.name} is signed in: carrying traffic")
        )
    if after.alive is False and (before is None or before.alive is not False):
        out.append(
            Event(
                EventKind.LINK_LOST,
                after.name,
                f"{after.name} stopped answering: taken out of all connections",
            )
        )
    elif after.alive and before is not None and before.alive is False:
        out.append(
            Event(EventKind.LINK_BACK, after.name, f"{after.name} answers again: carrying traffic")
        )
    if after.capped and not (before is not None and before.capped) and after.cap:
        out.append(
            Event(
                EventKind.CAP_REACHED,
                after.name,
                f"{after.name} reached its data cap ({after.used_bytes / 1e6:.0f} MB): "
                f"now {after.cap['then']}",
            )
        )
    return out


def best_events(before: str | None, after: Link | None, connected: bool | None) -> list[Event]:
    """The best link changed: new connections move (``connected``: None when not up)."""
    name = after.name if after else None
    if name == before or before is None or connected is None:
        return []
    if after is not None:
        return [
            Event(
                EventKind.FAILOVER,
                after.name,
                f"new connections now start on {after.name}",
                {"previous": before},
            )
        ]
    if connected:
        # Every link went silent at once: either all of them are down or the server is.
        return [
            Event(
                EventKind.NO_LINK,
                None,
                "no link reaches the server (is it down, or are all links offline?)",
                {"previous": before},
            )
        ]
    return []


def decide(
    links: Mapping[str, Link],
    inputs: Inputs,
    best_before: str | None = None,
    connected: bool | None = None,
) -> Decision:
    """One pass: the links as they should be, their routing, probes and the best link.

    ``links`` are the links as last decided (their slots, gateways and counters carry over);
    ``connected`` is whether the tunnels reach the server (None: Braid is not up).
    """
    names = wanted_names(inputs.named, inputs.discovered, inputs.added)
    out: dict[str, Link] = {}
    events: list[Event] = []
    for name, before in links.items():
        if name not in names:
            events += link_events(before, None)
    used_slots = {links[n].slot for n in names if n in links}
    for name in names:
        before = links.get(name)
        if before is None:
            slot = next((s for s in range(SLOTS) if s not in used_slots), None)
            if slot is None:
                continue  # more links than braidd has routing tables for
            used_slots.add(slot)
            link = Link(name=name, kind="other", priority=Priority.ALWAYS, order=0, slot=slot)
        else:
            link = before
        link = choose(
            link,
            inputs.choices.get(name, LinkChoice()),
            inputs.named.get(name),
            inputs.discovered.get(name),
            name in inputs.added,
        )
        view = inputs.views.get(name)
        link = observe(link, view)
        link = metered_use(link, inputs.used.get(name, link.used_bytes))
        connectivity = inputs.connectivity.get(name) if link.state is LinkState.UP else None
        link = replace(link, connectivity=connectivity)
        # A link behind a captive portal is neither probed nor routed: it is not dead, and
        # probes could only fail until the user signs in.
        carries = may_carry(link)
        if carries and inputs.probe_family is not None:
            link = replace(link, alive=inputs.alive.get(name, link.alive))
        else:
            link = replace(link, alive=None, health={})
        link = replace(link, carrying=carries and link.alive is not False)
        events += link_events(before, link)
        out[name] = link
    routing = {name: routing_for(link, inputs.views.get(name)) for name, link in out.items()}
    withdrawn = {name for name, want in routing.items() if want and out[name].alive is False}
    probe = {}
    if inputs.probe_family is not None:
        for name, want in routing.items():
            source = source_address(out[name], inputs.probe_family) if want else None
            if source is not None:
                probe[name] = source
    best = best_link(out)
    events += best_events(best_before, best, connected)
    return Decision(
        links=out,
        routing=routing,
        withdrawn=withdrawn,
        probe=probe,
        best=best.name if best else None,
        events=events,
    )


def capture_in_force(mode: str, up: bool, connected: bool, when_unreachable: str) -> str:
    """What happens to traffic that is not sent to the SOCKS5 port."""
    if mode != "system" or not up:
        return "off"
    if connected:
        return "tunnel"
    return "blocked" if when_unreachable == "block" else "direct"


def capture_plan(
    ports: tuple[int, int],
    server_addresses: list[str],
    links: Mapping[str, Link],
    bypass: list[str],
    reject_quic: bool,
    apps: AppGroups | None = None,
    scope: str = "all",
) -> capture.CapturePlan:
    """What system-wide capture installs: the server and the links' own networks go direct.
    ``scope`` "bonded": proxy mode, where only programs started with `braid bonded` are
    redirected; ``apps``: Braid's cgroups, when they exist."""
    ready = apps is not None and apps.root is not None
    return capture.CapturePlan(
        tcp_port=ports[0],
        udp_port=ports[1],
        server_addresses=list(server_addresses),
        link_subnets=sorted({net for link in links.values() for net in link.subnets}),
        bypass=capture.parse_bypass(bypass),
        reject_quic=reject_quic,
        link_devices=sorted(links),
        scope=scope,
        direct_apps=apps.ref("direct") if ready else None,
        bonded_apps=apps.ref("bonded") if ready else None,
    )


def connection_events(
    connected: bool | None, was_connected: bool, server: str, error: str | None
) -> list[Event]:
    """The tunnels reached the server, or lost it (``connected`` None: Braid is not up)."""
    if connected and not was_connected:
        return [Event(EventKind.CONNECTED, None, f"connected to {server}")]
    if connected is False and was_connected:
        return [Event(EventKind.SERVER_UNREACHABLE, None, f"lost the server: {error}")]
    return []


def daemon_state(up: bool, connected: bool, links: Mapping[str, Link]) -> str:
    if not up:
        return State.DISCONNECTED
    if not connected:
        return State.CONNECTING
    wanted = [link for link in links.values() if link.priority is not Priority.NEVER]
    if any(link.state is not LinkState.UP or link.alive is False for link in wanted):
        return State.DEGRADED
    return State.CONNECTED


#: A link never seen faster than this (bits per second) is not held for calls: its capacity is
#: unknown, and a hold under a guess would choke the download that reveals it.
HEADROOM_MIN_BPS = 1_000_000
#: The fastest second a link has shown counts for this long at half weight (seconds) ...
PEAK_HALF_LIFE = 300.0
#: ... and for this long while a download queues on it (what a full link carries is its rate).
QUEUE_HALF_LIFE = 5.0


def link_peak(
    peak: float, rx_bps: float, tx_bps: float, elapsed: float, held: bool, queue: bool
) -> float:
    """The download rate a link can carry (bits per second), a second later.

    While a download queues at its provider (``queue``, more received than sent, and at least
    half the peak) the link is full, so the rate comes down to what it carries within seconds
    (``QUEUE_HALF_LIFE``: one slow second does not make a slow link); a link carrying less than
    half its peak is not taken for full, whatever its round trip (other devices on the same
    Wi-Fi, jitter), so a false queue can never bring its rate down by more than half. Otherwise
    the fastest second it has shown, fading with ``PEAK_HALF_LIFE``. A held link's rate only
    rises: its seconds show the hold, not the link, and chasing them down would strangle it
    whenever its round trip stays up for another reason."""
    if queue and not held and rx_bps > tx_bps and rx_bps >= max(HEADROOM_MIN_BPS, peak / 2):
        return max(rx_bps, peak * 0.5 ** (max(0.0, elapsed) / QUEUE_HALF_LIFE))
    if rx_bps >= peak:
        return rx_bps
    if held:
        return peak
    return max(rx_bps, peak * 0.5 ** (max(0.0, elapsed) / PEAK_HALF_LIFE))


#: A link's round trip this far over its floor (ms, or a quarter of the floor if more) means a
#: queue is building in its provider's buffer.
QUEUE_MS = 5.0
#: A round trip's floor rises by this fraction a second towards a higher round trip (a route
#: that got longer is learned in a minute or two).
FLOOR_RISE = 0.01


def rtt_floor(
    floor: float | None, rtt_ms: float | None, elapsed: float, quiet: bool
) -> float | None:
    """A link's round trip without a queue: the lowest seen, creeping up towards what it is
    only while the link is ``quiet`` (carries almost nothing), so a long download's standing
    queue is never learned as the floor."""
    if rtt_ms is None:
        return floor
    if floor is None or rtt_ms <= floor:
        return rtt_ms
    if not quiet:
        return floor
    return min(rtt_ms, floor * (1 + FLOOR_RISE * max(0.0, elapsed)))


def queued(rtt_ms: float | None, floor: float | None) -> bool:
    """Is a queue building on the link (its round trip well over its floor)?"""
    if rtt_ms is None or floor is None:
        return False
    return rtt_ms - floor > max(QUEUE_MS, floor / 4)


def headroom(
    call_links: set[str],
    peaks: Mapping[str, float],
    percent: int,
    limits: Mapping[str, int],
    queues: set[str],
    gated: set[str],
) -> tuple[dict[str, int], set[str]]:
    """Headroom for calls: each link's limit for the tunnels' downloads (link -> bytes per
    second, ``percent`` under the link's peak), and the links held to it now: those a call uses
    where a queue builds (``queues``), and stay held while the call lasts (``gated``: held
    already), as a held link's queue is gone. A limit within a tenth of the wanted rate stays as
    it is (a new one starts its bucket full again); a link whose peak is under
    ``HEADROOM_MIN_BPS`` gets none."""
    if percent <= 0:
        return {}, set()
    out = {}
    for name, peak in sorted(peaks.items()):
        if peak < HEADROOM_MIN_BPS:
            continue
        want = int(peak * (100 - min(percent, 100)) / 100 / 8)
        now = limits.get(name)
        out[name] = now if now and abs(want - now) <= now / 10 else want
    held = {name for name in call_links if name in out and (name in queues or name in gated)}
    return out, held


__all__ = [
    "FLOOR_RISE",
    "HEADROOM_MIN_BPS",
    "PEAK_HALF_LIFE",
    "QUEUE_HALF_LIFE",
    "QUEUE_MS",
    "Decision",
    "Inputs",
    "Named",
    "State",
    "best_link",
    "capture_in_force",
    "capture_plan",
    "choose",
    "connection_events",
    "daemon_state",
    "decide",
    "headroom",
    "link_events",
    "link_peak",
    "may_carry",
    "metered_use",
    "observe",
    "ordered",
    "queued",
    "routing_for",
    "rtt_floor",
    "source_address",
    "wanted_names",
]
