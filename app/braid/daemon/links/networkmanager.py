"""NetworkManager's view of the devices, where it runs.

NetworkManager knows things sysfs does not: that a device is a modem managed
through ModemManager, and whether the active connection is metered (set by the
user, or guessed from an Android hotspot's DHCP option or a mobile broadband
connection). Braid reads it over the system D-Bus when it is there and does
without it when it is not: nothing here ever raises.

Parsing works on plain property dicts so it can be tested without a bus.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .classify import Classification

__all__ = [
    "CONNECTIVITY",
    "NmDevice",
    "NmView",
    "connectivity_of",
    "merge",
    "parse_device",
    "parse_devices",
    "read_devices",
    "read_view",
]

log = logging.getLogger(__name__)

NM_BUS_NAME = "org.freedesktop.NetworkManager"
NM_PATH = "/org/freedesktop/NetworkManager"
NM_INTERFACE = "org.freedesktop.NetworkManager"
NM_DEVICE_INTERFACE = "org.freedesktop.NetworkManager.Device"

# NMDeviceType, as far as Braid's kinds go; every other known type is "other".
DEVICE_KINDS = {
    1: "ethernet",  # NM_DEVICE_TYPE_ETHERNET (tethered phones show up as this too)
    2: "wifi",  # NM_DEVICE_TYPE_WIFI
    5: "cellular",  # NM_DEVICE_TYPE_BT: Bluetooth PAN/DUN to a phone
    7: "cellular",  # NM_DEVICE_TYPE_WIMAX
    8: "cellular",  # NM_DEVICE_TYPE_MODEM
}
DEVICE_TYPE_UNKNOWN = 0
DEVICE_TYPE_NAMES = {
    0: "unknown",
    1: "ethernet",
    2: "wifi",
    5: "bt",
    6: "olpc-mesh",
    7: "wimax",
    8: "modem",
    9: "infiniband",
    10: "bond",
    11: "vlan",
    12: "adsl",
    13: "bridge",
    14: "generic",
    15: "team",
    16: "tun",
    17: "ip-tunnel",
    18: "macvlan",
    19: "vxlan",
    20: "veth",
    21: "macsec",
    22: "dummy",
    23: "ppp",
    24: "ovs-interface",
    25: "ovs-port",
    26: "ovs-bridge",
    27: "wpan",
    28: "6lowpan",
    29: "wireguard",
    30: "wifi-p2p",
    31: "vrf",
    32: "loopback",
    33: "hsr",
    34: "ipvlan",
}

# NMMetered
METERED = {
    0: None,  # NM_METERED_UNKNOWN
    1: True,  # NM_METERED_YES
    2: False,  # NM_METERED_NO
    3: True,  # NM_METERED_GUESS_YES
    4: False,  # NM_METERED_GUESS_NO
}


# NMConnectivityState (NetworkManager 1.16 and later per device, Ip4Connectivity and
# Ip6Connectivity; the manager's Connectivity for the whole machine). 0 is unknown: NM has not
# checked, or its connectivity check is off.
CONNECTIVITY = {
    1: "none",  # no route out at all
    2: "portal",  # a captive portal answered the check: the user must sign in
    3: "limited",  # a route out, but the check URI did not answer
    4: "full",
}
_RANK = {"none": 0, "limited": 1, "portal": 2, "full": 3}


@dataclass(frozen=True)
class NmDevice:
    """One NetworkManager device, keyed by the kernel interface that carries its IP traffic."""

    name: str
    kind: str | None  # "ethernet" | "wifi" | "cellular" | "other"; None when NM does not know
    metered: bool | None
    device_type: int = DEVICE_TYPE_UNKNOWN  # NM's raw NMDeviceType, for display
    #: What NM's connectivity check found through this device ("none", "portal", "limited",
    #: "full"); None when unknown (NM older than 1.16, the check is off, or not checked yet).
    connectivity: str | None = None


@dataclass(frozen=True)
class NmView:
    """What braidd reads from NetworkManager in one go."""

    devices: dict[str, NmDevice]
    #: The manager's own Connectivity: the machine's as a whole (None: unknown).
    connectivity: str | None = None


def connectivity_of(ip4: Any, ip6: Any) -> str | None:
    """One device's connectivity from its IPv4 and IPv6 check: the better of the two.

    A link whose IPv6 reaches the internet while IPv4 hits a portal still carries Braid's
    IPv6 subflows, so the better family wins; unknown only when both are.
    """
    found = [CONNECTIVITY[v] for v in (_number(ip4), _number(ip6)) if v in CONNECTIVITY]
    return max(found, key=_RANK.__getitem__) if found else None


def parse_device(props: Mapping[str, Any]) -> NmDevice | None:
    """An :class:`NmDevice` from the device's D-Bus properties (plain values).

    A modem's ``Interface`` is its control port (``cdc-wdm0``, ``ttyUSB2``)
    and a Bluetooth device's is an address; the net device is ``IpInterface``,
    so that wins. None when the device has no kernel interface at all.
    """
    name = _text(props.get("IpInterface")) or _text(props.get("Interface"))
    if not name:
        return None
    device_type = _number(props.get("DeviceType"))
    if device_type == DEVICE_TYPE_UNKNOWN:
        kind = None
    elif device_type in DEVICE_KINDS:
        kind = DEVICE_KINDS[device_type]
    else:
        kind = "other"
    metered = METERED.get(_number(props.get("Metered")))
    connectivity = connectivity_of(props.get("Ip4Connectivity"), props.get("Ip6Connectivity"))
    return NmDevice(name, kind, metered, device_type, connectivity)


def parse_devices(all_props: Iterable[Mapping[str, Any]]) -> dict[str, NmDevice]:
    """Devices by interface name; the first one wins should NM list a name twice."""
    devices: dict[str, NmDevice] = {}
    for props in all_props:
        device = parse_device(props)
        if device is not None and device.name not in devices:
            devices[device.name] = device
    return devices


def unwrap_variants(props: Mapping[str, Any]) -> dict[str, Any]:
    """``a{sv}`` as jeepney returns it (``{name: (signature, value)}``) to plain values."""
    plain: dict[str, Any] = {}
    for key, value in props.items():
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
            value = value[1]
        plain[key] = value
    return plain


def read_devices(timeout: float = 2.0) -> dict[str, NmDevice] | None:
    """NetworkManager's devices by interface name, or None when it cannot be asked.

    None means no system bus, no NetworkManager on it, or no answer in
    *timeout* seconds; the caller then goes by sysfs alone. Never raises.
    """
    view = read_view(timeout)
    return view.devices if view is not None else None


def read_view(timeout: float = 2.0) -> NmView | None:
    """NetworkManager's devices and its global connectivity, or None (as :func:`read_devices`)."""
    try:
        return _read_view(timeout)
    except Exception as error:  # D-Bus, socket and parsing errors alike mean "no NM view"
        log.debug("NetworkManager not available: %s", error)
        return None


def merge(classification: Classification, nm: NmDevice | None) -> Classification:
    """Refine a sysfs classification with NetworkManager's view of the same interface.

    NM's modem and Bluetooth devices are cellular links even when sysfs cannot
    tell (a modem's multiplexed data interface may be virtual). NM calls a USB
    tethered phone "ethernet", so an NM ethernet never overrides a cellular
    guess; it only names a physical "other". NM's Metered, guessed or set, wins
    over the guess from the kind.
    """
    if nm is None:
        return classification
    kind, is_link = classification.kind, classification.is_link
    notes: list[str] = []
    if nm.kind == "cellular" and kind != "cellular":
        kind, is_link = "cellular", True
        notes.append(f"NetworkManager: {DEVICE_TYPE_NAMES.get(nm.device_type, 'cellular')}")
    elif nm.kind == "wifi" and kind != "wifi":
        kind = "wifi"
        notes.append("NetworkManager: Wi-Fi")
    elif nm.kind == "ethernet" and kind == "other" and is_link:
        kind = "ethernet"
        notes.append("NetworkManager: Ethernet")
    metered = classification.metered
    if nm.metered is not None:
        if nm.metered != metered:
            notes.append("NetworkManager: " + ("metered" if nm.metered else "not metered"))
        metered = nm.metered
    if not notes:
        return dataclasses.replace(classification, metered=metered)
    reason = "; ".join([classification.reason, *notes])
    return dataclasses.replace(
        classification, kind=kind, is_link=is_link, metered=metered, reason=reason
    )


def _read_view(timeout: float) -> NmView:
    # Imported here so that the rest of Braid loads even where jeepney is missing.
    from jeepney import DBusAddress, DBusErrorResponse, Properties, new_method_call
    from jeepney.io.blocking import open_dbus_connection

    deadline = time.monotonic() + timeout

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"NetworkManager did not answer in {timeout} s")
        return remaining

    with open_dbus_connection(bus="SYSTEM", auth_timeout=left()) as conn:
        manager = DBusAddress(NM_PATH, bus_name=NM_BUS_NAME, interface=NM_INTERFACE)
        reply = conn.send_and_get_reply(new_method_call(manager, "GetDevices"), timeout=left())
        (paths,) = _unwrap(reply)
        all_props = []
        for path in paths:
            device = DBusAddress(path, bus_name=NM_BUS_NAME, interface=NM_DEVICE_INTERFACE)
            reply = conn.send_and_get_reply(Properties(device).get_all(), timeout=left())
            try:
                (props,) = _unwrap(reply)
            except DBusErrorResponse as error:
                # The device went away between the two calls (a phone unplugged).
                log.debug("NetworkManager device %s: %s", path, error)
                continue
            all_props.append(unwrap_variants(props))
        reply = conn.send_and_get_reply(Properties(manager).get("Connectivity"), timeout=left())
        try:
            (connectivity,) = _unwrap(reply)
            connectivity = CONNECTIVITY.get(_number(connectivity[1]))
        except DBusErrorResponse:
            connectivity = None
    return NmView(parse_devices(all_props), connectivity)


def _unwrap(reply: Any) -> tuple[Any, ...]:
    from jeepney.wrappers import unwrap_msg

    return tuple(unwrap_msg(reply))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _number(value: Any) -> int:
    # 0 is "unknown" in both NMDeviceType and NMMetered.
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
