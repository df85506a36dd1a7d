"""The bypass list's entries: addresses, networks and domain names, checked.

Shared by braidd (which applies the list), the command line and the tray (which name a bad entry
before anything is sent). A name covers its subdomains: ``netflix.com`` also means
``www.netflix.com``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class Bypass:
    """The user's bypass list, split: networks go into the ruleset, names into the DNS relay."""

    networks: tuple[str, ...] = ()
    names: tuple[str, ...] = ()


def parse_name(text: str) -> str:
    """A domain name as the bypass list keeps it (lower case, no final dot); ValueError if not one."""
    name = text.strip().lower().removesuffix(".")
    if name.startswith("*."):  # "*.example.com" means what "example.com" does
        name = name[2:]
    labels = name.split(".")
    if (
        len(name) > 253
        or len(labels) < 2
        or not all(_LABEL.match(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise ValueError(
            f"{text!r} is not an address, a network (e.g. 192.0.2.0/24) or a domain name "
            "(e.g. example.com, which covers its subdomains)"
        )
    return name


def split_bypass(entries: list[str]) -> Bypass:
    """Validate the user's bypass list: addresses, networks and domain names; raises ValueError
    naming the culprit."""
    networks: list[str] = []
    names: list[str] = []
    for entry in entries:
        if not isinstance(entry, str) or not entry.strip():
            raise ValueError(f"{entry!r} is not an address, a network or a domain name")
        try:
            networks.append(str(ipaddress.ip_network(entry.strip(), strict=False)))
            continue
        except ValueError:
            pass
        if any(c in entry for c in ":/") or re.fullmatch(r"[\d.\s]+", entry):
            raise ValueError(
                f"{entry!r} is not an address or a network (e.g. 192.0.2.0/24, 2001:db8::/48)"
            )
        names.append(parse_name(entry))
    return Bypass(tuple(dict.fromkeys(networks)), tuple(dict.fromkeys(names)))


__all__ = ["Bypass", "parse_name", "split_bypass"]
