"""Settings declared once, as data: the tray's own and the daemon's, and where they are kept.

Every setting has a key, a type, a default, a label and help text; the settings dialog
builds its simple pages from these declarations, so adding a setting means adding one
entry here. The tray's own settings live in a QSettings file under
$XDG_CONFIG_HOME/braid/; the daemon's come with their schema from ``get-settings``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PySide6.QtCore import QSettings

from braid.bypass import split_bypass

LOCAL = "local"  # kept by the tray, for this user
DAEMON = "daemon"  # kept by braidd, changed with set-settings


@dataclass(frozen=True)
class SettingSpec:
    key: str
    type: type
    default: Any
    label: str
    help: str
    page: str
    scope: str = LOCAL
    choices: tuple[tuple[str, str], ...] = ()  # (value, label) pairs
    not_yet: dict[str, str] = field(default_factory=dict)  # value → why, while no daemon offers it
    unavailable: dict[str, str] = field(default_factory=dict)  # value → why it can't be picked
    minimum: float | None = None
    maximum: float | None = None
    supported: bool = True  # False: the running daemon does not know this setting yet
    #: Raises ValueError, with the message the user sees, for a value the daemon would refuse.
    check: Callable[[Any], Any] | None = None


LOCAL_SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec(
        "start_at_login",
        bool,
        False,
        "Start Braid when I log in",
        "Puts the tray icon back in the panel at every login (an XDG autostart entry).",
        page="General",
    ),
    SettingSpec(
        "notifications",
        bool,
        True,
        "Show notifications",
        "A message when a link is lost or comes back, when new connections move to another "
        "link, when a data cap is reached, and when the daemon stops answering.",
        page="General",
    ),
    SettingSpec(
        "panel",
        str,
        "auto",
        "Tray icon for",
        "Draw the tray icon for a light or a dark panel; automatic follows the desktop's colour scheme.",
        page="General",
        choices=(("auto", "Automatic"), ("light", "A light panel"), ("dark", "A dark panel")),
    ),
)

# The Traffic page: daemon settings, declared here for their labels even before a daemon
# offers them (they are then shown but disabled, with the reason).
TRAFFIC_SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec(
        "mode",
        str,
        "proxy",
        "Traffic mode",
        "Proxy only: applications set to use Braid's SOCKS5 proxy go through it (the address "
        "is on the dashboard). System-wide: every connection of this laptop, DNS included.",
        page="Traffic",
        scope=DAEMON,
        choices=(("proxy", "Proxy only (SOCKS5)"), ("system", "System-wide")),
        not_yet={"system": "coming soon"},
    ),
    SettingSpec(
        "prefer_tcp_for_web",
        bool,
        True,
        "Make browsers use TCP instead of QUIC",
        "QUIC (HTTP/3) runs over UDP, which Multipath TCP cannot spread over your links. "
        "Refusing it makes browsers fall back to TCP at once, which is bonded.",
        page="Traffic",
        scope=DAEMON,
    ),
    SettingSpec(
        "when_server_unreachable",
        str,
        "direct",
        "When the server is unreachable",
        "Go direct: traffic leaves through the best link until the server answers again. "
        "Block: nothing leaves this laptop outside the tunnel.",
        page="Traffic",
        scope=DAEMON,
        choices=(("direct", "Go direct"), ("block", "Block")),
    ),
    SettingSpec(
        "bypass",
        list,
        [],
        "Go direct to",
        "Addresses, networks or domain names reached without Braid in system-wide mode, one "
        "per line (e.g. 192.0.2.10, 2001:db8::/48, netflix.com, which covers its subdomains).",
        page="Traffic",
        scope=DAEMON,
        check=split_bypass,
    ),
)

_TYPES = {"bool": bool, "int": int, "float": float, "str": str, "list": list}


def daemon_specs(schema: list[dict[str, Any]]) -> list[SettingSpec]:
    """The daemon's settings as specs: Traffic ones with our labels, the rest on Advanced.

    A declared Traffic setting the daemon does not offer stays visible but unsupported; a
    choice the daemon does not accept is shown as unavailable.
    """
    offered = {item["key"]: item for item in schema if isinstance(item, dict) and "key" in item}
    specs: list[SettingSpec] = []
    for spec in TRAFFIC_SETTINGS:
        item = offered.pop(spec.key, None)
        if item is None:
            specs.append(replace(spec, supported=False))
            continue
        unavailable: dict[str, str] = {}
        if item.get("choices"):
            allowed = set(item["choices"])
            for value, _label in spec.choices:
                if value not in allowed:
                    unavailable[value] = spec.not_yet.get(value, "not offered by this daemon")
        specs.append(
            replace(
                spec,
                default=item.get("default", spec.default),
                minimum=item.get("minimum"),
                maximum=item.get("maximum"),
                unavailable=unavailable,
            )
        )
    for key, item in offered.items():
        choices = tuple((str(c), str(c)) for c in item.get("choices") or ())
        specs.append(
            SettingSpec(
                key,
                _TYPES.get(str(item.get("type")), str),
                item.get("default"),
                str(item.get("label") or key),
                str(item.get("help") or ""),
                page="Advanced",
                scope=DAEMON,
                choices=choices,
                minimum=item.get("minimum"),
                maximum=item.get("maximum"),
            )
        )
    return specs


def config_dir() -> Path:
    """$XDG_CONFIG_HOME/braid, read at each call so tests and sandboxes can move it."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "braid"


@dataclass(frozen=True)
class SavedPairing:
    """Where the server is and which certificate to trust; the token is in the keyring."""

    host: str
    port: int
    fingerprint: str

    @property
    def server(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class Preferences:
    """The tray's own settings and the saved pairing, in $XDG_CONFIG_HOME/braid/tray.conf."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or config_dir() / "tray.conf"
        self.qsettings = QSettings(str(self.path), QSettings.Format.IniFormat)
        self._specs = {spec.key: spec for spec in LOCAL_SETTINGS}

    def value(self, key: str) -> Any:
        spec = self._specs[key]
        raw = self.qsettings.value(f"tray/{key}", spec.default)
        if spec.type is bool:
            return raw if isinstance(raw, bool) else str(raw).lower() in ("true", "1", "yes")
        if spec.type is str and spec.choices and raw not in {v for v, _ in spec.choices}:
            return spec.default
        return spec.type(raw)

    def values(self) -> dict[str, Any]:
        return {key: self.value(key) for key in self._specs}

    def set_value(self, key: str, value: Any) -> None:
        if key not in self._specs:
            raise KeyError(key)
        self.qsettings.setValue(f"tray/{key}", value)
        self.qsettings.sync()

    def pairing(self) -> SavedPairing | None:
        host = self.qsettings.value("server/host")
        port = self.qsettings.value("server/port")
        fingerprint = self.qsettings.value("server/fingerprint")
        if not host or not port or not fingerprint:
            return None
        try:
            return SavedPairing(str(host), int(port), str(fingerprint))
        except (TypeError, ValueError):
            return None

    def set_pairing(self, pairing: SavedPairing) -> None:
        self.qsettings.setValue("server/host", pairing.host)
        self.qsettings.setValue("server/port", pairing.port)
        self.qsettings.setValue("server/fingerprint", pairing.fingerprint)
        self.qsettings.sync()
