"""The daemon's general settings, declared once as data.

Each setting has a type, a default, a label and help text; the control API
validates against this list and the tray builds its pages from it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from braid.bypass import split_bypass
from braid.files import object_field, read_versioned_json, write_json

log = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Setting:
    key: str
    type: type
    default: Any
    label: str
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    #: Checks the entries of a list further; raises ValueError naming the bad one.
    entries: Callable[[list[str]], Any] | None = None

    def check(self, value: Any) -> Any:
        if self.type is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{self.key} must be true or false")
            return value
        if self.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{self.key} must be a whole number")
        elif self.type is str:
            if not isinstance(value, str):
                raise ValueError(f"{self.key} must be a string")
            if self.choices and value not in self.choices:
                raise ValueError(f"{self.key} must be one of {', '.join(self.choices)}")
        elif self.type is list and (
            not isinstance(value, list) or not all(isinstance(v, str) for v in value)
        ):
            raise ValueError(f"{self.key} must be a list of strings")
        if self.entries is not None:
            self.entries(value)
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"{self.key} must be at least {self.minimum:g}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"{self.key} must be at most {self.maximum:g}")
        return value

    def describe(self) -> dict:
        out = {
            "key": self.key,
            "type": self.type.__name__,
            "default": self.default,
            "label": self.label,
            "help": self.help,
        }
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        if self.choices:
            out["choices"] = list(self.choices)
        return out


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "discover_links",
        bool,
        True,
        "Use every link found",
        "Bond every Ethernet, Wi-Fi and cellular interface the daemon finds, besides those named with --link.",
    ),
    Setting(
        "probe_interval_ms",
        int,
        200,
        "Health probe interval (ms)",
        "How often each link asks the server for an echo. A link that stops answering is taken out of all connections within a second.",
        minimum=50,
        maximum=2000,
    ),
    Setting(
        "pool_size",
        int,
        4,
        "Warm connections",
        "Tunnel connections kept ready so a new connection costs no handshake.",
        minimum=0,
        maximum=32,
    ),
    Setting(
        "mode",
        str,
        "proxy",
        "Traffic mode",
        "proxy: only applications set to use the SOCKS5 proxy go through Braid. "
        "system: all of the laptop's TCP and UDP (DNS included) goes through Braid.",
        choices=("proxy", "system"),
    ),
    Setting(
        "prefer_tcp_for_web",
        bool,
        True,
        "Prefer TCP for the web",
        "Refuse QUIC (UDP port 443) so browsers use TCP, which Multipath TCP spreads over all links.",
    ),
    Setting(
        "udp_realtime",
        str,
        "redundant",
        "Calls and games",
        "How real-time UDP (small datagrams at a steady rate, DSCP EF/AF4x, STUN/TURN/WebRTC "
        "ports, flows carrying STUN, or the ports listed below) travels. redundant: on the two "
        "links of lowest delay at once, the first copy wins (at most twice the flow's own "
        "traffic). fastest: on the link of lowest delay. tunnel: inside a tunnel connection, as "
        "TCP does.",
        choices=("redundant", "fastest", "tunnel"),
    ),
    Setting(
        "udp_other",
        str,
        "fastest",
        "Other UDP",
        "How the rest of UDP travels (a real-time flow that turns bulk too; it is never "
        "duplicated then): fastest, redundant or tunnel, as for calls.",
        choices=("fastest", "redundant", "tunnel"),
    ),
    Setting(
        "realtime_ports",
        list,
        [],
        "Real-time ports",
        "Destination ports (e.g. 5004 or 10000-20000) whose UDP flows are always treated as "
        "real-time.",
    ),
    Setting(
        "call_headroom",
        int,
        20,
        "Headroom for calls (%)",
        "While a call or game uses a link where a download through Braid builds a queue at the "
        "provider, downloads through Braid on that link are held this far under the link's "
        "rate, so the call's packets do not wait behind them. Downloads lose that share of one "
        "link while the call lasts. 0: off.",
        minimum=0,
        maximum=50,
    ),
    Setting(
        "when_server_unreachable",
        str,
        "direct",
        "When the server is unreachable",
        "direct: traffic goes straight out of the best link until the server answers again. "
        "block: nothing leaves the laptop outside the tunnel.",
        choices=("direct", "block"),
    ),
    Setting(
        "bypass",
        list,
        [],
        "Go direct to",
        "Addresses, networks or domain names (e.g. 192.0.2.10, 2001:db8::/48, netflix.com, which "
        "covers its subdomains) reached without Braid in system-wide mode.",
        entries=split_bypass,
    ),
)
BY_KEY = {s.key: s for s in SETTINGS}


class Settings:
    """Current values, persisted in the state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / SETTINGS_FILE
        self.values: dict[str, Any] = {s.key: s.default for s in SETTINGS}
        self.problems: list[str] = []

    def load(self) -> Settings:
        data = read_versioned_json(self.path, FORMAT_VERSION, self.problems)
        saved = object_field(data, "settings", self.path, self.problems)
        for key, value in saved.items():
            if key in BY_KEY:
                try:
                    self.values[key] = BY_KEY[key].check(value)
                except ValueError as exc:
                    self.problems.append(f"setting {key} ignored: {exc}")
        return self

    def update(self, changes: dict[str, Any]) -> None:
        checked = {}
        for key, value in changes.items():
            if key not in BY_KEY:
                raise ValueError(f"unknown setting {key!r}")
            checked[key] = BY_KEY[key].check(value)
        values = {**self.values, **checked}
        write_json(self.path, {"version": FORMAT_VERSION, "settings": values})
        self.values = values

    def __getitem__(self, key: str) -> Any:
        return self.values[key]
