"""Headroom for calls: the nftables rules that hold the tunnels' downloads on a call's link."""

from __future__ import annotations

from braid.daemon.routing import headroom

SERVERS = ["198.18.20.2", "2001:db8:20::2"]


def test_a_links_limit_counts_the_servers_data_packets_and_drops_only_when_gated() -> None:
    script = headroom.script(None, {"eth0": 2_000_000}, {"eth0"}, SERVERS, 7443)
    lines = [line.strip() for line in script.splitlines()]
    link, hold = "link_" + b"eth0".hex(), "hold_" + b"eth0".hex()
    assert f'iifname "eth0" jump {link}' in lines
    # Both families go to the link's one limit: one bucket per link.
    assert f"ip saddr 198.18.20.2 tcp sport 7443 goto {hold}" in lines
    assert f"ip6 saddr 2001:db8:20::2 tcp sport 7443 goto {hold}" in lines
    assert [line for line in lines if "limit" in line] == [
        "meta length >= 1000 limit rate over 1333/second burst 10 packets iifname @calls "
        "counter drop"
    ]
    assert 'elements = { "eth0" }' in lines


def test_a_link_that_merges_received_packets_is_limited_in_bytes() -> None:
    script = headroom.script(None, {"wlan0": 2_000_000}, set(), SERVERS, 7443, {"wlan0"})
    assert "limit rate over 1953 kbytes/second burst 64 kbytes" in script


def test_scoped_and_unparsable_servers_are_written_plainly_or_left_out() -> None:
    script = headroom.script(None, {"eth0": 2_000_000}, set(), ["fe80::1%eth0", "vps"], 7443)
    assert "ip6 saddr fe80::1 tcp sport 7443" in script and "vps" not in script


def test_a_changed_rate_or_gate_touches_only_that_links_limit_or_the_set() -> None:
    before = {"eth0": 2_000_000, "wlan0": 1_000_000}
    gate_only = headroom.script(before, before, {"wlan0"}, SERVERS, 7443)
    assert gate_only == (
        f"flush set inet {headroom.TABLE} calls\n"
        f'add element inet {headroom.TABLE} calls {{ "wlan0" }}\n'
    )
    one = headroom.script(before, {**before, "wlan0": 900_000}, set(), SERVERS, 7443)
    assert f"flush chain inet {headroom.TABLE} hold_{b'wlan0'.hex()}" in one
    assert b"eth0".hex() not in one
    assert "delete table" in headroom.script(before, {"eth0": 2_000_000}, set(), SERVERS, 7443)


def test_no_limits_and_unquotable_devices_leave_no_table() -> None:
    for limits in ({}, {'eth0" accept; #': 2_000_000}, {"eth0": 0}):
        script = headroom.script(None, limits, set(limits), SERVERS, 7443)
        assert script == f"table inet {headroom.TABLE}\ndelete table inet {headroom.TABLE}\n"


def test_a_device_that_cannot_be_asked_is_taken_to_merge_packets() -> None:
    assert headroom.receive_offload("nosuchdev0") is True


def test_nft_takes_the_limits_opens_and_closes_the_gate_and_removes_them(nft) -> None:
    limits = {"eth0": 1_000_000, "wlan-1.2": 1_500_000}
    done = nft("-f", "-", script=headroom.script(None, limits, set(), SERVERS, 7443))
    assert done.returncode == 0, done.stderr
    assert nft("list", "table", "inet", headroom.TABLE).stdout.count("limit rate over") == 2
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
        assert listed.count("limit rate over") == 2
        before = after
    assert "limit rate over 533/second" in listed
    done = nft("-f", "-", script=headroom.script(before, {}, set(), SERVERS, 7443))
    assert done.returncode == 0, done.stderr
    assert nft("list", "tables").stdout.strip() == ""
