"""The destination policy: pure functions, no network."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from braid.server.policy import Policy, PolicyError, judge, normalise

OWN = frozenset({ipaddress.ip_address("203.0.113.5"), ipaddress.ip_address("2001:db8:5::5")})


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.45.0.9", "loopback"),
        ("::1", "loopback"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("0.0.0.0", "not a host address"),
        ("0.1.2.3", "not a host address"),
        ("::", "not a host address"),
        ("255.255.255.255", "not a host address"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("169.254.169.254", "cloud metadata service"),
        ("fd00:ec2::254", "cloud metadata service"),
        ("100.100.100.200", "cloud metadata service"),
        ("203.0.113.5", "an address of the server itself"),
        ("2001:db8:5::5", "an address of the server itself"),
        # IPv4-mapped IPv6 reaches the IPv4 address on a dual-stack socket.
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "cloud metadata service"),
        ("::ffff:203.0.113.5", "an address of the server itself"),
        ("not an address", "not an IP address"),
    ],
)
def test_refused_by_default(address: str, reason: str) -> None:
    assert judge(address, Policy(), OWN) == reason


@pytest.mark.parametrize(
    "address",
    ["93.184.216.34", "2606:2800:220:1::1", "10.1.2.3", "192.168.1.1", "::ffff:1.1.1.1"],
)
def test_allowed_by_default(address: str) -> None:
    assert judge(address, Policy(), OWN) is None


def test_allow_overrides_the_builtin_refusals() -> None:
    policy = Policy.from_config(allow=["127.0.0.0/8", "203.0.113.5", "fe80::/10"])
    assert judge("127.0.0.1", policy, OWN) is None
    assert judge("::ffff:127.0.0.1", policy, OWN) is None
    assert judge("203.0.113.5", policy, OWN) is None
    assert judge("fe80::1%eth0", policy, OWN) is None
    assert judge("::1", policy, OWN) == "loopback"  # another family, not allowed


def test_deny_adds_networks_and_wins_over_allow() -> None:
    policy = Policy.from_config(allow=["10.0.0.0/8"], deny=["10.9.0.0/16", "2001:db8:bad::/48"])
    assert judge("10.1.1.1", policy) is None
    assert judge("10.9.1.1", policy) == "denied by the server's configuration"
    assert judge("::ffff:10.9.1.1", policy) == "denied by the server's configuration"
    assert judge("2001:db8:bad::1", policy) == "denied by the server's configuration"
    assert judge("2001:db8:600d::1", policy) is None


def test_own_addresses_only_when_given() -> None:
    assert judge("203.0.113.5", Policy()) is None
    assert judge("203.0.113.5", Policy(), OWN) is not None


def test_config_networks_are_validated() -> None:
    assert Policy.from_config(allow=[" 192.0.2.7/24 "]).allow == (
        ipaddress.ip_network("192.0.2.0/24"),
    )
    with pytest.raises(PolicyError, match="allow: 'nonsense'"):
        Policy.from_config(allow=["nonsense"])
    with pytest.raises(PolicyError, match="deny"):
        Policy.from_config(deny=["10.0.0.0/33"])


def test_normalise() -> None:
    assert normalise("::ffff:10.0.0.1") == ipaddress.ip_address("10.0.0.1")
    assert normalise("fe80::1%eth0") == ipaddress.ip_address("fe80::1")
    assert normalise(ipaddress.ip_address("2001:db8::1")) == ipaddress.ip_address("2001:db8::1")


@given(st.ip_addresses())
def test_mapped_addresses_are_judged_as_ipv4(address) -> None:
    if address.version == 4:
        mapped = ipaddress.IPv6Address(f"::ffff:{address}")
        assert judge(mapped, Policy(), OWN) == judge(address, Policy(), OWN)


@given(st.text(max_size=60))
def test_judge_never_raises_on_text(text: str) -> None:
    result = judge(text, Policy(), OWN)
    assert result is None or isinstance(result, str)
