"""System-wide capture's ruleset and bypass list: validation without root, nft's verdict with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from braid.bypass import split_bypass
from braid.daemon.routing import capture
from braid.daemon.routing.apps import GroupRef, cgroup2_mounts, check_name

PLAN = capture.CapturePlan(
    tcp_port=1234,
    udp_port=1235,
    server_addresses=["198.18.20.2", "2001:db8:20::2"],
    link_subnets=["198.18.1.0/24", "2001:db8:1::/64"],
    bypass=["198.19.5.0/24"],
    link_devices=["eth0", "wlan0"],
)


@pytest.mark.parametrize(
    ("entries", "networks", "names"),
    [
        (["192.0.2.10", "2001:db8::/48"], ("192.0.2.10/32", "2001:db8::/48"), ()),
        (["Netflix.COM.", "*.example.org", "netflix.com"], (), ("netflix.com", "example.org")),
        (["xn--bcher-kva.example", "a-b.c0.test"], (), ("xn--bcher-kva.example", "a-b.c0.test")),
    ],
)
def test_bypass_accepts_addresses_networks_and_names(entries, networks, names) -> None:
    found = split_bypass(entries)
    assert found.networks == networks and found.names == names


@pytest.mark.parametrize(
    "entry",
    [
        "localhost",
        "exa mple.com",
        "-bad.com",
        "bad-.com",
        "192.0.2.300",
        "10.0.0.0/33",
        "",
        "a..b",
        "1.2.3",
        "2001:db8::g",
        "example.com/24",
        "x" * 64 + ".com",
    ],
)
def test_bypass_refuses_what_is_neither(entry) -> None:
    with pytest.raises(ValueError, match="not an address"):
        split_bypass(["192.0.2.1", entry])


def test_every_path_out_ends_in_a_refusal_or_a_capture() -> None:
    chains = capture.chains(PLAN)
    assert chains["filter_output"][-1] == "reject with icmpx type admin-prohibited"
    assert chains["filter_forward"][-1] == "reject with icmpx type admin-prohibited"
    assert chains["nat_output"][-1].startswith("meta l4proto tcp redirect")
    assert any("tproxy" in rule and "l4proto tcp" in rule for rule in chains["tproxy_prerouting"])
    # DNS is captured before anything returns direct, for the laptop and for forwarded traffic.
    for name in ("nat_output", "tproxy_prerouting"):
        rules = chains[name]
        first_dns = next(i for i, r in enumerate(rules) if "dport 53" in r)
        first_direct = next(i for i, r in enumerate(rules) if "@direct4" in r)
        assert first_dns < first_direct
    assert capture.rule_count(PLAN) == sum(len(r) for r in chains.values())


def test_without_links_nothing_forwarded_is_touched() -> None:
    plan = capture.CapturePlan(1234, 1235)
    chains = capture.chains(plan)
    assert chains["filter_forward"] == ["ct direction reply return"]
    assert not any("tproxy" in r for r in chains["tproxy_prerouting"][2:])


def test_nft_accepts_the_ruleset_and_a_new_plan_keeps_bypassed_names(nft) -> None:
    done = nft("-f", "-", script=capture.ruleset(PLAN))
    assert done.returncode == 0, done.stderr
    added = nft("add", "element", "inet", "braid", "bypass4", "{ 198.19.7.7 timeout 60s }")
    assert added.returncode == 0, added.stderr
    changed = capture.CapturePlan(**{**PLAN.__dict__, "link_subnets": ["198.18.2.0/24"]})
    done = nft("-f", "-", script=capture.ruleset(changed))
    assert done.returncode == 0, done.stderr
    listed = nft("list", "table", "inet", "braid").stdout
    assert "198.19.7.7" in listed  # the bypass sets survive an update
    assert "198.18.2.0/24" in listed and "198.18.1.0/24" not in listed
    assert listed.count("reject with icmpx admin-prohibited") == 2


GROUP_DIRECT = GroupRef(2, "unified/braid/direct")
GROUP_BONDED = GroupRef(2, "unified/braid/bonded")


def test_a_direct_program_returns_before_anything_is_captured() -> None:
    plan = capture.CapturePlan(**{**PLAN.__dict__, "direct_apps": GROUP_DIRECT})
    chains = capture.chains(plan)
    for name in ("nat_output", "filter_output", "route_output"):
        assert chains[name][1] == 'socket cgroupv2 level 2 "unified/braid/direct" return', name


def test_proxy_mode_redirects_only_the_bonded_programs_tcp() -> None:
    plan = capture.CapturePlan(**{**PLAN.__dict__, "scope": "bonded", "bonded_apps": GROUP_BONDED})
    chains = capture.chains(plan)
    assert [name for name, rules in chains.items() if rules] == ["nat_output"]
    assert chains["nat_output"][-1] == (
        'socket cgroupv2 level 2 "unified/braid/bonded" meta l4proto tcp redirect to :1234'
    )
    assert capture.rule_count(plan) == 5
    nobody = capture.CapturePlan(**{**PLAN.__dict__, "scope": "bonded"})
    assert capture.rule_count(nobody) == 0


def test_cgroup2_mounts_are_read_from_mountinfo() -> None:
    text = (
        "31 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
        "50 25 0:40 / /run/my\\040cgroups rw - cgroup2 none rw\n"
    )
    assert cgroup2_mounts(text) == [Path("/sys/fs/cgroup/unified"), Path("/run/my cgroups")]


@pytest.mark.parametrize("name", ["braid", "brd12x0-laptop", "a.b_c"])
def test_cgroup_names(name) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "..", "a/b", "-x", "x" * 65])
def test_bad_cgroup_names_are_refused(name) -> None:
    with pytest.raises(ValueError, match="not a cgroup name"):
        check_name(name)
