"""Path management per flow, as pure decisions: when a flow spreads, and how a flow's subflows
are reconciled with the links (no root, no network)."""

from __future__ import annotations

import socket

from braid.daemon.routing.paths import Subflow
from braid.daemon.tunnel import spread
from braid.daemon.tunnel.spread import Flow, PathLink, links_to_join, plan

SERVER = ("198.18.20.2", 7443)
ETH = PathLink("eth0", 2, ("198.18.1.2", "2001:db8:1::2"), (180, 181), rtt_ms=10)
WLAN = PathLink("wlan0", 3, ("198.18.2.2",), (182, 183), rtt_ms=40)
USB = PathLink("usb0", 4, ("198.18.3.2",), (184, 185), backup=True, rtt_ms=100)
LINKS = [ETH, WLAN, USB]


def flow(**kw) -> Flow:
    sock = socket.socket()
    sock.close()
    base = {"token": 1, "sock": sock, "remote": SERVER, "family": socket.AF_INET}
    f = Flow(**(base | kw))
    f.links.add("eth0")
    f.ids["198.18.1.2"] = 0
    f.backup["eth0"] = False
    return f


def sub(address: str, port: int = 40000) -> Subflow:
    return Subflow((address, port), SERVER)


def test_a_short_flow_stays_on_its_first_link() -> None:
    f = flow(bytes=spread.SPREAD_BYTES - 1, started=0.0)
    assert links_to_join(f, LINKS, now=10.0) == []


def test_a_busy_flow_adds_a_link_after_round_trips_of_that_link(monkeypatch) -> None:
    monkeypatch.setattr(spread, "SPREAD_RTTS", 2.0)
    f = flow(bytes=spread.SPREAD_BYTES, started=0.0)
    # 2 round trips of wlan0 (40 ms) have passed, not 2 of usb0 (100 ms).
    assert links_to_join(f, LINKS, now=0.09) == [WLAN]
    assert links_to_join(f, LINKS, now=0.25) == [WLAN, USB]


def test_dead_links_and_links_without_the_family_never_join() -> None:
    dead = PathLink("wlan0", 3, ("198.18.2.2",), (182, 183), usable=False, rtt_ms=1)
    f = flow(bytes=1 << 30, started=0.0, family=socket.AF_INET6)
    assert links_to_join(f, [ETH, dead, USB], now=100.0) == []  # usb0 has no IPv6 address


def test_with_the_default_a_flow_spreads_as_soon_as_it_carried_enough() -> None:
    f = flow(bytes=spread.SPREAD_BYTES, started=0.0)
    assert links_to_join(f, LINKS, now=0.0) == [WLAN, USB]


def test_an_unmeasured_link_is_taken_as_slow(monkeypatch) -> None:
    monkeypatch.setattr(spread, "SPREAD_RTTS", 2.0)
    unknown = PathLink("wlan0", 3, ("198.18.2.2",), (182, 183))
    f = flow(bytes=spread.SPREAD_BYTES, started=0.0)
    assert links_to_join(f, [ETH, unknown], now=0.1) == []
    assert links_to_join(f, [ETH, unknown], now=0.2) == [unknown]


def test_reconcile_moves_a_short_flow_off_a_dead_link_new_subflow_first() -> None:
    dead_eth = PathLink("eth0", 2, ETH.addresses, ETH.local_ids, usable=False)
    f = flow()
    todo, links = plan(f, [sub("198.18.1.2")], [dead_eth, WLAN, USB])
    assert todo.create == [WLAN]  # the best working always link
    assert todo.destroy == [(sub("198.18.1.2"), 0)]  # withdraws address id 0: RM_ADDR
    assert links == {"wlan0"}


def test_reconcile_uses_a_backup_link_when_no_always_link_works() -> None:
    dead = [PathLink(p.name, p.ifindex, p.addresses, p.local_ids, usable=False) for p in LINKS[:2]]
    f = flow()
    todo, links = plan(f, [sub("198.18.1.2")], [*dead, USB])
    assert todo.create == [USB]
    assert links == {"usb0"}


def test_reconcile_gives_a_bulk_flow_back_the_links_that_returned() -> None:
    f = flow(spread=True)
    todo, links = plan(f, [sub("198.18.1.2")], LINKS)
    assert todo.create == [WLAN, USB]
    assert not todo.destroy
    assert links == {"eth0", "wlan0", "usb0"}


def test_reconcile_leaves_a_healthy_short_flow_alone() -> None:
    todo, links = plan(flow(), [sub("198.18.1.2")], LINKS)
    assert (todo.create, todo.destroy, todo.backup) == ([], [], [])
    assert links == {"eth0"}


def test_reconcile_flips_the_backup_flag_when_a_priority_changes() -> None:
    eth_backup = PathLink("eth0", 2, ETH.addresses, ETH.local_ids, backup=True)
    f = flow()
    todo, links = plan(f, [sub("198.18.1.2")], [WLAN, eth_backup])
    assert todo.backup == [(sub("198.18.1.2"), True)]
    # eth0 may no longer carry on its own: the always link joins.
    assert todo.create == [WLAN]
    assert links == {"eth0", "wlan0"}


def test_a_link_that_is_gone_from_the_list_is_withdrawn_by_its_id() -> None:
    """A link that went down leaves the list; its subflow is still withdrawn by address id, so
    the server hears of it (RM_ADDR) instead of sending into the dead link."""
    f = flow()
    f.ids["198.18.3.2"] = 184
    subs = [sub("198.18.2.2"), sub("198.18.3.2"), sub("198.18.9.9")]
    todo, links = plan(f, subs, [WLAN])
    assert todo.destroy == [(sub("198.18.3.2"), 184), (sub("198.18.9.9"), None)]
    assert links == {"wlan0"}


def test_a_failure_in_path_management_never_breaks_the_flow(caplog) -> None:
    def broken_links():
        raise RuntimeError("boom")

    class Active:
        active = True

    spreading = spread.Spreading(Active(), broken_links, run=None)  # type: ignore[arg-type]
    f = flow(bytes=0, started=0.0)
    spreading.carried(f, spread.SPREAD_BYTES)  # must not raise
    assert f.next_check == float("inf")
    assert "path management failed" in caplog.text
    spreading.carried(f, 1 << 20)  # and is quiet afterwards


def test_placement_fills_the_least_loaded_always_link_and_never_a_backup_or_dead_one() -> None:
    always = [ETH, WLAN, PathLink("usb0", 4, ("198.18.3.2",), (184, 185), rtt_ms=100)]
    first = flow(links={"eth0", "wlan0", "usb0"}, spread=True)  # the page: spread over all
    placed: list[Flow] = [first]
    homes = []
    for _ in range(5):  # the page's other connections, opened while the first is busy
        home = spread.place(flow(), always, placed)
        assert home is not None
        homes.append(home.name)
        placed.append(flow(home=home.name))
    assert homes == ["eth0", "wlan0", "usb0", "eth0", "wlan0"]  # ties go to the best link
    assert spread.place(flow(), LINKS, [flow(home="eth0"), flow(home="wlan0")]).name == "eth0"
    dead = [PathLink(p.name, p.ifindex, p.addresses, p.local_ids, usable=False) for p in LINKS]
    assert spread.place(flow(), dead, placed) is None


def test_a_flow_is_busy_from_its_adoption_and_while_it_carries() -> None:
    f = flow(adopted=100.0)
    assert f.busy(100.2) and not f.busy(101.0)
    f.bytes, f.last = 10, 103.0
    assert f.busy(103.4) and not f.busy(104.0)
