"""Links as the daemon tracks them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

KINDS = ("ethernet", "wifi", "cellular", "other")


class Priority(enum.StrEnum):
    ALWAYS = "always"  # carries traffic
    BACKUP = "backup"  # carries traffic only when no "always" link works
    NEVER = "never"  # carries nothing


class LinkState(enum.StrEnum):
    UP = "up"  # usable: has an address and a way out
    NO_ADDRESS = "no-address"  # the device is up but has no usable address yet
    DOWN = "down"  # the device is down or has no carrier
    MISSING = "missing"  # no such device (unplugged)


def default_priority(kind: str) -> Priority:
    # Phones and modems are usually metered: use them only when nothing else works.
    return Priority.BACKUP if kind == "cellular" else Priority.ALWAYS


def parse_link_option(text: str) -> tuple[str, str | None, Priority | None]:
    """``IFACE[:KIND[:PRIORITY]]`` from the command line."""
    name, _, rest = text.partition(":")
    kind, _, priority = rest.partition(":")
    if not name:
        raise ValueError(f"--link needs an interface name, got {text!r}")
    if kind and kind not in KINDS:
        raise ValueError(f"unknown link kind {kind!r} (one of {', '.join(KINDS)})")
    try:
        chosen = Priority(priority) if priority else None
    except ValueError:
        raise ValueError(
            f"unknown priority {priority!r} (one of {', '.join(p.value for p in Priority)})"
        ) from None
    return name, kind or None, chosen


@dataclass
class Link:
    name: str
    kind: str
    priority: Priority
    order: int
    slot: int
    state: LinkState = LinkState.MISSING
    addresses: list[str] = field(default_factory=list)
    subnets: list[str] = field(default_factory=list)  # reached directly in system-wide mode
    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_bps: float = 0.0
    tx_bps: float = 0.0
    configured: bool = False  # named with --link or added by the user: kept while unplugged
    added: bool = False  # added by the user (braid links add); braid links remove forgets it
    metered: bool = False
    cap: dict | None = None
    used_bytes: int = 0
    capped: bool = False  # the cap is reached: ``effective`` is the cap's priority
    effective: Priority | None = None
    alive: bool | None = None  # the health probes' verdict; None without probes
    health: dict = field(default_factory=dict)
    carrying: bool = False  # its MPTCP endpoint is in place
    subflows: int = 0  # TCP subflows to the server leaving from its addresses
    gateway4: str | None = None
    gateway6: str | None = None
    #: NetworkManager's connectivity check through it: "none", "portal", "limited", "full";
    #: None where NetworkManager does not run or has not checked.
    connectivity: str | None = None

    @property
    def sign_in_required(self) -> bool:
        """Behind a captive portal: it cannot reach the server until the user signs in."""
        return self.connectivity == "portal"

    @property
    def usable(self) -> bool:
        """Up, allowed to carry traffic, not known to be dead, and not behind a portal."""
        return (
            self.state is LinkState.UP
            and self.effective is not Priority.NEVER
            and self.alive is not False
            and not self.sign_in_required
        )

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "priority": str(self.priority),
            "effective_priority": str(self.effective or self.priority),
            "order": self.order,
            "added": self.added,
            "state": str(self.state),
            "alive": self.alive,
            "carrying": self.carrying,
            "subflows": self.subflows,
            "addresses": list(self.addresses),
            "rx_bps": round(self.rx_bps),
            "tx_bps": round(self.tx_bps),
            "rx_bytes": self.rx_bytes,
            "tx_bytes": self.tx_bytes,
            "metered": self.metered,
            "cap": self.cap,
            "used_bytes": self.used_bytes,
            "capped": self.capped,
            "rtt_ms": self.health.get("rtt_ms"),
            "jitter_ms": self.health.get("jitter_ms"),
            "loss": self.health.get("loss"),
            "connectivity": self.connectivity,
        }
