"""Headroom for calls: the nftables rules that hold the tunnels' downloads on a call's link."""

from __future__ import annotations

from braid.daemon.routing import headroom

SERVERS = ["198.18.20.2", "2001:db8:20::2"]


def test_a_limit_counts_the_servers_tcp_on_its_link_and_drops_only_when_gated() -> None:
    script = headroom.script(None, {"eth0": 2_000_000}, {"eth0"}, SERVERS, 7443)
    lines = [line.strip() for line in script.splitlines()]
    assert 'iifname "eth0" jump link_eth0' in lines
    assert [line for line in lines if "limit" in line] == [
        "ip saddr 198.18.20.2 tcp sport 7443 meta length >= 1000 limit rate over 1333/second "
        "burst 10 packets iifname @calls counter drop",
        "ip6 saddr 2001:db8:20::2 tcp sport 7443 meta length >= 1000 limit rate over "
        "1333/second burst 10 packets iifname @calls counter drop",
    ]
    assert 'elements = { "eth0" }' in lines


def test_a_changed_rate_or_gate_touches_only_that_links_chain_or_the_set() -> None:
    before = {"eth0": 2_000_000, "wlan0": 1_000_000}
    gate_only = headroom.script(before, before, {"wlan0"}, SERVERS, 7443)
    assert gate_only == (
        f"flush set inet {headroom.TABLE} calls\n"
        f'add element inet {headroom.TABLE} calls {{ "wlan0" }}\n'
    )
    one = headroom.script(before, {**before, "wlan0": 900_000}, set(), SERVERS, 7443)
    assert f"flush chain inet {headroom.TABLE} link_wlan0" in one and "eth0" not in one
    assert "delete table" in headroom.script(before, {"eth0": 2_000_000}, set(), SERVERS, 7443)


def test_no_limits_and_unquotable_devices_leave_no_table() -> None:
    for limits in ({}, {'eth0" accept; #': 2_000_000}, {"eth0": 0}):
        script = headroom.script(None, limits, set(limits), SERVERS, 7443)
        assert script == f"table inet {headroom.TABLE}\ndelete table inet {headroom.TABLE}\n"


def test_nft_takes_the_limits_opens_and_closes_the_gate_and_removes_them(nft) -> None:
    limits = {"eth0": 1_000_000, "wlan-1.2": 1_500_000}
    done = nft("-f", "-", script=headroom.script(None, limits, set(), SERVERS, 7443))
    assert done.returncode == 0, done.stderr
    assert nft("list", "table", "inet", headroom.TABLE).stdout.count("limit rate over") == 4
    before = limits
    for gated, changed in (
        ({"eth0", "wlan-1.2"}, {}),
        ({"wlan-1.2"}, {"eth0": 800_000}),
        (set(), {}),
    ):
        after = {**before, **changed}
        done = nft("-f", "-", script=headroom.script(before, after, gated, SERVERS, 7443))
        assert done.returncode == 0, done.stderr
        listed = nft("list", "table", "inet", headroom.TABLE).stdout
        elements = listed.split("elements = {")[1].split("}")[0] if "elements" in listed else ""
        assert all((f'"{name}"' in elements) == (name in gated) for name in limits), listed
        assert listed.count("limit rate over") == 4
        before = after
    assert "limit rate over 533/second" in listed
    done = nft("-f", "-", script=headroom.script(before, {}, set(), SERVERS, 7443))
    assert done.returncode == 0, done.stderr
    assert nft("list", "tables").stdout.strip() == ""
