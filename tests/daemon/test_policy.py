"""braidd's link policy, pure: observations and choices in, a decision out. No root, no I/O."""

from __future__ import annotations

import socket

import pytest

from braid.daemon import policy
from braid.daemon.links.model import LinkState, Priority
from braid.daemon.links.store import Cap, LinkChoice
from braid.daemon.policy import Inputs, Named
from braid.daemon.routing.policy import DeviceView
from braid.protocol.events import EventKind


def view(name: str, index: int, v4: str | None = "198.18.1.2", up: bool = True) -> DeviceView:
    return DeviceView(
        name=name,
        ifindex=index,
        up=up,
        carrier=up,
        addresses4=[(v4, 24)] if v4 else [],
        gateway4="198.18.1.1" if v4 else None,
    )


WORLD = {
    "eth0": view("eth0", 2, "198.18.1.2"),
    "wlan0": view("wlan0", 3, "198.18.2.2"),
    "usb0": view("usb0", 4, "198.18.3.2"),
}
KINDS = {"eth0": ("ethernet", False), "wlan0": ("wifi", False), "usb0": ("cellular", True)}


def inputs(**over) -> Inputs:
    base = dict(discovered=KINDS, views=WORLD, probe_family=socket.AF_INET)
    base.update(over)
    return Inputs(**base)


def kinds(events) -> list[tuple[str, str | None]]:
    return [(str(e.kind), e.link) for e in events]


def test_discovered_links_get_kind_defaults_slots_and_routing() -> None:
    d = policy.decide({}, inputs())
    assert [link.name for link in policy.ordered(d.links)] == ["eth0", "usb0", "wlan0"]
    assert d.links["usb0"].priority is Priority.BACKUP  # cellular: metered, backup
    assert d.links["usb0"].metered
    assert {link.slot for link in d.links.values()} == {0, 1, 2}
    assert all(d.routing[n] is not None for n in WORLD)
    assert d.routing["usb0"].backup and not d.routing["eth0"].backup
    assert d.best in ("eth0", "wlan0")
    assert d.probe == {"eth0": "198.18.1.2", "wlan0": "198.18.2.2", "usb0": "198.18.3.2"}
    assert sorted(kinds(d.events)) == sorted(
        [(k, n) for n in WORLD for k in ("link-found", "link-up")]
    )


@pytest.mark.parametrize(
    ("choice", "named", "want_priority", "want_order"),
    [
        (LinkChoice(), None, Priority.ALWAYS, 100),  # discovery's default, order by slot
        (LinkChoice(), Named(None, Priority.BACKUP, 3), Priority.BACKUP, 3),  # --link wins
        (
            LinkChoice(priority=Priority.NEVER, order=0),
            Named(None, Priority.BACKUP, 3),
            Priority.NEVER,
            0,
        ),  # the stored choice wins over --link
    ],
)
def test_choices_win_over_link_options_over_discovery(choice, named, want_priority, want_order):
    d = policy.decide(
        {},
        inputs(
            views={"eth0": WORLD["eth0"]},
            discovered={"eth0": KINDS["eth0"]},
            named={"eth0": named} if named else {},
            choices={"eth0": choice},
        ),
    )
    link = d.links["eth0"]
    assert (link.priority, link.order) == (want_priority, want_order)
    if want_priority is Priority.NEVER:
        assert d.routing["eth0"] is None and d.best is None and not d.probe


@pytest.mark.parametrize(
    ("device", "state"),
    [
        (None, LinkState.MISSING),
        (view("eth0", 2, up=False), LinkState.DOWN),
        (view("eth0", 2, v4=None), LinkState.NO_ADDRESS),
        (view("eth0", 2), LinkState.UP),
    ],
)
def test_state_comes_from_the_device(device, state) -> None:
    d = policy.decide(
        {},
        inputs(
            views={"eth0": device},
            discovered={},
            named={"eth0": Named("ethernet", None, 0)},
        ),
    )
    assert d.links["eth0"].state is state
    assert (d.routing["eth0"] is not None) == (state is LinkState.UP)


def test_a_dead_link_is_withdrawn_and_loses_best_then_comes_back() -> None:
    first = policy.decide({}, inputs())
    assert first.best == "eth0"
    dead = policy.decide(first.links, inputs(alive={"eth0": False}), first.best, connected=True)
    assert dead.withdrawn == {"eth0"}
    assert dead.routing["eth0"] is not None  # table and rules stay: the probes go on
    assert not dead.links["eth0"].carrying
    assert dead.best == "wlan0"
    assert ("link-lost", "eth0") in kinds(dead.events)
    assert ("failover", "wlan0") in kinds(dead.events)
    back = policy.decide(dead.links, inputs(alive={"eth0": True}), dead.best, connected=True)
    assert back.withdrawn == set() and back.best == "eth0"
    assert ("link-back", "eth0") in kinds(back.events)


def test_a_link_behind_a_captive_portal_needs_sign_in_and_comes_back() -> None:
    first = policy.decide({}, inputs(alive={"eth0": True}), connected=True)
    assert first.best == "eth0"
    portal = policy.decide(
        first.links,
        inputs(alive={"eth0": True}, connectivity={"eth0": "portal", "wlan0": "full"}),
        first.best,
        connected=True,
    )
    link = portal.links["eth0"]
    assert link.sign_in_required and link.to_json()["connectivity"] == "portal"
    # not used: no routing, no probes, not the best link
    assert portal.routing["eth0"] is None and "eth0" not in portal.probe
    assert not link.carrying and not link.usable
    assert portal.best == "wlan0"
    # not reported as failed: not dead, still up, no link-lost, the state is not degraded
    assert link.alive is None and link.state is LinkState.UP
    assert ("sign-in-required", "eth0") in kinds(portal.events)
    assert "link-lost" not in [k for k, _ in kinds(portal.events)]
    assert policy.daemon_state(True, True, portal.links) == policy.State.CONNECTED
    # still behind the portal: said once
    again = policy.decide(
        portal.links, inputs(connectivity={"eth0": "portal"}), portal.best, connected=True
    )
    assert "sign-in-required" not in [k for k, _ in kinds(again.events)]
    # signed in: NetworkManager's check reaches the internet; used again at once
    back = policy.decide(
        again.links, inputs(connectivity={"eth0": "full"}), again.best, connected=True
    )
    assert back.routing["eth0"] is not None and back.probe["eth0"] == "198.18.1.2"
    assert back.links["eth0"].carrying and back.best == "eth0"
    assert ("link-back", "eth0") in kinds(back.events)


@pytest.mark.parametrize("connectivity", ["none", "limited", "full", None])
def test_only_a_portal_keeps_a_link_out(connectivity) -> None:
    # "limited" and "none" say only that NetworkManager's check URI did not answer; the
    # server may still: the probes decide.
    d = policy.decide({}, inputs(connectivity={"eth0": connectivity} if connectivity else {}))
    assert d.routing["eth0"] is not None and d.best == "eth0"
    assert d.links["eth0"].connectivity == connectivity


def test_a_portal_on_a_link_that_is_down_is_forgotten() -> None:
    d = policy.decide(
        {},
        inputs(views={**WORLD, "eth0": view("eth0", 2, up=False)}, connectivity={"eth0": "portal"}),
    )
    assert d.links["eth0"].connectivity is None
    assert "sign-in-required" not in [k for k, _ in kinds(d.events)]


def test_without_probes_nothing_is_withdrawn() -> None:
    first = policy.decide({}, inputs())
    dead = policy.decide(first.links, inputs(alive={"eth0": False}))
    stopped = policy.decide(dead.links, inputs(probe_family=None, alive={"eth0": False}))
    assert stopped.withdrawn == set() and stopped.links["eth0"].alive is None
    assert stopped.probe == {}


def test_every_link_silent_says_no_link_only_when_connected() -> None:
    first = policy.decide({}, inputs())
    silent = {n: False for n in WORLD}
    d = policy.decide(first.links, inputs(alive=silent), first.best, connected=True)
    assert d.best is None and ("no-link", None) in kinds(d.events)
    d = policy.decide(first.links, inputs(alive=silent), first.best, connected=False)
    assert "no-link" not in [k for k, _ in kinds(d.events)]


def test_a_cap_reached_changes_the_effective_priority_once() -> None:
    cap = Cap(limit_bytes=1000, then=Priority.NEVER)
    choices = {"wlan0": LinkChoice(cap=cap)}
    first = policy.decide({}, inputs(choices=choices, used={"wlan0": 999}))
    assert first.links["wlan0"].effective is Priority.ALWAYS
    over = policy.decide(first.links, inputs(choices=choices, used={"wlan0": 1000}))
    assert over.links["wlan0"].capped and over.links["wlan0"].effective is Priority.NEVER
    assert over.routing["wlan0"] is None
    assert kinds(over.events).count(("cap-reached", "wlan0")) == 1
    again = policy.decide(over.links, inputs(choices=choices, used={"wlan0": 5000}))
    assert ("cap-reached", "wlan0") not in kinds(again.events)


def test_a_vanished_link_is_removed_and_its_slot_reused() -> None:
    first = policy.decide({}, inputs())
    gone = {n: v for n, v in WORLD.items() if n != "wlan0"}
    d = policy.decide(first.links, inputs(views=gone, discovered={k: KINDS[k] for k in gone}))
    assert "wlan0" not in d.links and "wlan0" not in d.routing
    assert ("link-removed", "wlan0") in kinds(d.events)
    new = dict(gone, wlan1=view("wlan1", 9, "198.18.9.2"))
    d2 = policy.decide(
        d.links,
        inputs(views=new, discovered={**{k: KINDS[k] for k in gone}, "wlan1": ("wifi", None)}),
    )
    assert d2.links["wlan1"].slot == first.links["wlan0"].slot


def test_backup_link_is_best_only_when_no_always_link_works() -> None:
    first = policy.decide({}, inputs())
    d = policy.decide(first.links, inputs(alive={"eth0": False, "wlan0": False}), "eth0", True)
    assert d.best == "usb0"
    assert policy.best_link(d.links, socket.AF_INET6) is None  # no IPv6 address anywhere


def test_order_decides_among_always_links() -> None:
    choices = {"wlan0": LinkChoice(order=0), "eth0": LinkChoice(order=1)}
    d = policy.decide({}, inputs(choices=choices))
    assert d.best == "wlan0"


@pytest.mark.parametrize(
    ("mode", "up", "connected", "when", "want"),
    [
        ("proxy", True, True, "block", "off"),
        ("system", False, False, "block", "off"),
        ("system", True, True, "block", "tunnel"),
        ("system", True, False, "block", "blocked"),
        ("system", True, False, "direct", "direct"),
    ],
)
def test_capture_decision(mode, up, connected, when, want) -> None:
    assert policy.capture_in_force(mode, up, connected, when) == want


def test_daemon_state() -> None:
    d = policy.decide({}, inputs())
    assert policy.daemon_state(False, False, d.links) == "disconnected"
    assert policy.daemon_state(True, False, d.links) == "connecting"
    assert policy.daemon_state(True, True, d.links) == "connected"
    dead = policy.decide(d.links, inputs(alive={"usb0": False}))
    assert policy.daemon_state(True, True, dead.links) == "degraded"


def test_event_kinds_are_declared_once_with_level_and_title() -> None:
    for kind in EventKind:
        assert kind.level in ("info", "warning", "error") and kind.title
    assert EventKind.SERVER_UNREACHABLE.level == "error"
    message = policy.link_events(None, policy.decide({}, inputs()).links["eth0"])[0].to_json(1.0)
    assert message["level"] == "info" and message["title"] == "A link was found"


# -- headroom for calls ----------------------------------------------------------------------

MBIT = 1_000_000


@pytest.mark.parametrize(
    ("peak", "rx", "tx", "elapsed", "held", "queue", "want"),
    [
        (0.0, 20 * MBIT, 0, 1.0, False, False, 20 * MBIT),  # a faster second is the new peak
        (20 * MBIT, 1 * MBIT, 0, policy.PEAK_HALF_LIFE, False, False, 10 * MBIT),  # fades by half
        (20 * MBIT, 15 * MBIT, 0, policy.PEAK_HALF_LIFE, False, False, 15 * MBIT),  # never under now
        (20 * MBIT, 1 * MBIT, 0, policy.PEAK_HALF_LIFE, True, False, 20 * MBIT),  # held: its seconds lie
        (20 * MBIT, 25 * MBIT, 0, 1.0, True, False, 25 * MBIT),  # held, yet faster: the link showed it
        # A download queues at the provider: the link is full, its rate comes down to what it
        # carries within seconds ...
        (20 * MBIT, 12 * MBIT, 0.3 * MBIT, policy.QUEUE_HALF_LIFE, False, True, 12 * MBIT),
        (20 * MBIT, 11 * MBIT, 0.3 * MBIT, policy.QUEUE_HALF_LIFE / 5, False, True, 20 * MBIT * 0.5 ** 0.2),
        (20 * MBIT, 25 * MBIT, 0.3 * MBIT, 1.0, False, True, 25 * MBIT),
        (20 * MBIT, 8 * MBIT, 0.3 * MBIT, 1.0, True, True, 20 * MBIT),  # ... but not while held,
        # nor below half the peak: a false queue (other devices on the Wi-Fi) is not a full link.
        (20 * MBIT, 3 * MBIT, 0.3 * MBIT, 1.0, False, True, 20 * MBIT * 0.5 ** (1 / 300)),
        # ... not when an upload fills it (more sent than received), nor at a trickle.
        (20 * MBIT, 0.5 * MBIT, 9 * MBIT, 1.0, False, True, 20 * MBIT * 0.5 ** (1 / 300)),
        (20 * MBIT, 0.2 * MBIT, 0, 1.0, True, True, 20 * MBIT),
    ],
)  # fmt: skip
def test_a_links_rate_is_its_fastest_second_fading_unless_held_or_what_it_carries_when_full(
    peak, rx, tx, elapsed, held, queue, want
):
    assert policy.link_peak(peak, rx, tx, elapsed, held, queue) == pytest.approx(want)


E, W = 20 * MBIT, 12 * MBIT
BOTH = {"eth0", "wlan0"}
LIMITS = {"eth0": 2_000_000, "wlan0": 1_200_000}


@pytest.mark.parametrize(
    ("calls", "peaks", "percent", "limits", "queues", "gated", "want", "held"),
    [
        # Every link with a known peak gets a limit 20 % under it (bytes per second); a call on
        # eth0, where a queue builds, holds eth0 to it.
        ({"eth0"}, {"eth0": E, "wlan0": W}, 20, {}, {"eth0"}, set(), LIMITS, {"eth0"}),
        # Held already: it stays held while the call lasts, although its queue is gone.
        ({"eth0"}, {"eth0": E, "wlan0": W}, 20, LIMITS, set(), {"eth0"}, LIMITS, {"eth0"}),
        # A call, but no queue on its link (nothing fills it): not held.
        ({"eth0"}, {"eth0": E, "wlan0": W}, 20, {}, set(), set(), LIMITS, set()),
        # No call: the limits count, nothing is held, queue or not.
        (set(), {"eth0": E, "wlan0": W}, 20, {}, BOTH, {"eth0"}, LIMITS, set()),
        # A redundant call uses two links: both held.
        (BOTH, {"eth0": E, "wlan0": W}, 25, {}, BOTH, set(), {"eth0": 1_875_000, "wlan0": 1_125_000}, BOTH),
        ({"eth0"}, {"eth0": E}, 0, {}, BOTH, set(), {}, set()),  # 0: off
        # Never seen busy: capacity unknown, no limit, so not held either.
        ({"eth0"}, {"eth0": 0.5 * MBIT, "wlan0": W}, 20, {}, BOTH, set(), {"wlan0": 1_200_000}, set()),
        # Within a tenth of the limit: kept (a new one would start a full bucket again) ...
        ({"eth0"}, {"eth0": 21 * MBIT}, 20, {"eth0": 2_000_000}, BOTH, set(), {"eth0": 2_000_000}, {"eth0"}),
        # ... further: the new rate.
        ({"eth0"}, {"eth0": 25 * MBIT}, 20, {"eth0": 2_000_000}, BOTH, set(), {"eth0": 2_500_000}, {"eth0"}),
    ],
)  # fmt: skip
def test_every_known_link_is_limited_and_a_calls_queued_link_held(
    calls, peaks, percent, limits, queues, gated, want, held
):
    assert policy.headroom(calls, peaks, percent, limits, queues, gated) == (want, held)


def test_a_links_floor_is_its_lowest_round_trip_creeping_up_and_a_queue_is_well_over_it():
    assert policy.rtt_floor(None, 10.0, 1.0, True) == 10.0
    assert policy.rtt_floor(10.0, 8.0, 1.0, False) == 8.0
    assert policy.rtt_floor(10.0, None, 1.0, True) == 10.0
    assert policy.rtt_floor(10.0, 28.0, 1.0, True) == pytest.approx(10.1)  # 1 % a second
    floor = 10.0
    for _ in range(600):  # a long download's standing queue is never learned
        floor = policy.rtt_floor(floor, 28.0, 1.0, False)
    assert floor == 10.0 and policy.queued(28.0, floor)
    for _ in range(120):  # a longer route, two quiet minutes on: learned
        floor = policy.rtt_floor(floor, 14.0, 1.0, True)
    assert floor == 14.0
    assert policy.queued(28.0, 10.0) and not policy.queued(14.0, 10.0)
    assert not policy.queued(120.0, 100.0) and policy.queued(130.0, 100.0)  # a quarter over
    assert not policy.queued(None, 10.0) and not policy.queued(28.0, None)
