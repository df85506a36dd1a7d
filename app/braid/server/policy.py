"""Which destinations braid-server agrees to connect to.

Only authenticated clients ever reach this check, so the server is never an
open proxy; the policy protects the server's own machine and its cloud
provider's metadata service from the (trusted, but possibly compromised or
confused) laptop. Everything here is pure so it can be tested without a network.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Instance metadata services (AWS/GCP/Azure/OpenStack, AWS over IPv6, Alibaba):
# they hand out credentials to whoever asks from the instance.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)

# "This network" (0/8) and the limited broadcast address are not destinations either.
_NOT_A_HOST: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("0.0.0.0/8"),
    ipaddress.ip_network("255.255.255.255/32"),
)


class PolicyError(ValueError):
    """A network in the configuration is not valid."""


@dataclass(frozen=True, slots=True)
class Policy:
    """Networks the administrator allows despite the built-in refusals, and extra ones to refuse.

    A destination in both lists is refused: ``deny`` always wins.
    """

    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_config(cls, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> Policy:
        return cls(_networks(allow, "allow"), _networks(deny, "deny"))


def _networks(items: Iterable[str], key: str) -> tuple[IPNetwork, ...]:
    out: list[IPNetwork] = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError:
            raise PolicyError(f"policy {key}: {item!r} is not an IP network") from None
    return tuple(out)


def normalise(address: str | IPAddress) -> IPAddress:
    """Parse ``address``, dropping an IPv6 zone and unwrapping IPv4-mapped IPv6.

    ``::ffff:127.0.0.1`` reaches 127.0.0.1 on a dual-stack socket, so it must
    be judged as that IPv4 address.
    """
    if isinstance(address, str):
        address = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            address = ipaddress.IPv6Address(address.packed)
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
    return address


def _in(address: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    return any(address.version == net.version and address in net for net in networks)


def builtin_refusal(address: IPAddress, own: Collection[IPAddress] = ()) -> str | None:
    """Why the built-in rules refuse ``address``, or None; both already normalised."""
    if address in METADATA_ADDRESSES:
        return "cloud metadata service"
    if address.is_unspecified or _in(address, _NOT_A_HOST):
        return "not a host address"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address in own:
        return "an address of the server itself"
    return None


def judge(
    address: str | IPAddress, policy: Policy = Policy(), own: Collection[IPAddress] = ()
) -> str | None:
    """None when the server may connect to ``address``, else the reason it may not.

    ``own`` holds the server's interface addresses (normalised): reaching them
    would expose services that listen only on the server's private side.
    """
    try:
        ip = normalise(address)
    except ValueError:
        return "not an IP address"
    if _in(ip, policy.deny):
        return "denied by the server's configuration"
    if _in(ip, policy.allow):
        return None
    return builtin_refusal(ip, own)
