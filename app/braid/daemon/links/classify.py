"""What kind of link a network interface is, read from sysfs.

The kernel already knows most of it: the driver behind a USB tethered phone
(rndis_host, cdc_ncm, ipheth…), the ``DEVTYPE`` of a Wi-Fi or WWAN interface,
whether the device has a parent at all (virtual devices such as bridges, veth
pairs, tun/tap and docker networks do not, and live under
``devices/virtual``). Everything is read below a sysfs root that is a
parameter, so tests can hand in a made-up tree.

Classification never raises for a missing or odd interface: it answers
"other, not a link" with the reason, since interfaces come and go while we
look (a phone unplugged between listing and reading).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CachedClassifier", "Classification", "classify", "classify_all"]

# ARPHRD_* values from <linux/if_arp.h> that matter here.
ARPHRD_ETHER = 1
ARPHRD_CAN = 280
ARPHRD_RAWIP = 519
ARPHRD_LOOPBACK = 772
ARPHRD_IEEE80211_RADIOTAP = 803  # a Wi-Fi interface in monitor mode
ARPHRD_IEEE802154 = 804
ARPHRD_IEEE802154_MONITOR = 805
ARPHRD_NONE = 65534

# Physical devices of these types carry no IP traffic: never links.
NON_IP_TYPES = {
    ARPHRD_CAN: "CAN bus",
    ARPHRD_IEEE80211_RADIOTAP: "Wi-Fi in monitor mode",
    ARPHRD_IEEE802154: "IEEE 802.15.4",
    ARPHRD_IEEE802154_MONITOR: "IEEE 802.15.4 monitor",
}

# Drivers of phones and modems: what they are, for the reason shown to the user.
CELLULAR_DRIVERS = {
    "rndis_host": "USB tethering",
    "cdc_ether": "USB tethering",
    "cdc_ncm": "USB tethering",
    "ipheth": "iPhone tethering",
    "huawei_cdc_ncm": "Huawei modem",
    "cdc_mbim": "mobile broadband modem, MBIM",
    "qmi_wwan": "mobile broadband modem, QMI",
    "sierra_net": "Sierra Wireless modem",
    "option": "USB modem",
    "hso": "Option modem",
    "mhi_net": "PCIe modem over MHI",
}

# cdc_ether and cdc_ncm also drive many USB Ethernet adapters and docks (a
# Realtek RTL8156 binds cdc_ncm when r8152 does not claim it). Their USB vendor
# tells them from phones; these vendors make Ethernet chips and docks, not
# phones.
ADAPTER_AMBIGUOUS_DRIVERS = {"cdc_ether", "cdc_ncm"}
ETHERNET_ADAPTER_VENDORS = {
    "0bda": "Realtek",
    "0b95": "ASIX",
    "0424": "Microchip",
    "2357": "TP-Link",
    "13b1": "Linksys",
    "2001": "D-Link",
    "17ef": "Lenovo",
    "413c": "Dell",
    "03f0": "HP",
}
ADAPTER_PRODUCT_WORDS = ("ethernet", "gigabit", " lan", "lan ", "dock")

# Drivers of USB Ethernet adapters, named so the reason says "adapter" rather
# than leaving the user to wonder whether a phone was missed.
USB_ETHERNET_DRIVERS = {
    "r8152",
    "ax88179_178a",
    "asix",
    "smsc95xx",
    "smsc75xx",
    "lan78xx",
    "dm9601",
    "mcs7830",
    "aqc111",
    "cdc_eem",
}

# DEVTYPE values of virtual devices, for the reason.
VIRTUAL_DEVTYPES = {
    "bridge": "bridge",
    "bond": "bonding master",
    "vlan": "VLAN sub-interface",
    "wireguard": "WireGuard tunnel",
    "macsec": "MACsec",
    "vxlan": "VXLAN",
    "geneve": "Geneve tunnel",
    "ipvlan": "ipvlan",
    "macvlan": "macvlan",
    "team": "team master",
}

# Name prefixes that say what an otherwise anonymous virtual device is.
VIRTUAL_NAME_HINTS = (
    ("veth", "veth pair"),
    ("docker", "Docker network"),
    ("br-", "Docker network bridge"),
    ("virbr", "libvirt network"),
    ("vnet", "virtual machine tap"),
    ("dummy", "dummy device"),
    ("ifb", "intermediate functional block"),
    ("wg", "WireGuard tunnel"),
    ("tailscale", "Tailscale tunnel"),
    ("zt", "ZeroTier tunnel"),
)


@dataclass(frozen=True)
class Classification:
    """One interface as Braid sees it: its kind, and whether it can be a link at all."""

    name: str
    kind: str  # "ethernet" | "wifi" | "cellular" | "other"
    is_link: bool  # False for loopback and virtual devices: never offered as links by default
    metered: bool | None  # a guess from the kind: True for cellular, None when unknown
    reason: str  # short human explanation, e.g. "driver rndis_host (USB tethering)"
    driver: str | None
    devtype: str | None


def classify(name: str, sysfs: Path = Path("/sys")) -> Classification:
    """Classify interface *name* from ``<sysfs>/class/net/<name>``."""
    if not name or "/" in name or name in (".", ".."):
        return _other(name, False, "not an interface name")
    base = sysfs / "class" / "net" / name
    if not os.path.lexists(base) or not base.is_dir():
        return _other(name, False, "no such interface")
    uevent = _read_uevent(base / "uevent")
    devtype = uevent.get("DEVTYPE") or None
    arptype = _read_int(base / "type")
    device_dir = _device_path(base, sysfs)
    has_parent = os.path.lexists(base / "device")
    driver = _driver(base / "device")
    virtual = device_dir is None or device_dir[:2] == ("devices", "virtual") or not has_parent

    def result(kind: str, is_link: bool, reason: str) -> Classification:
        metered = True if kind == "cellular" else None
        return Classification(name, kind, is_link, metered, reason, driver, devtype)

    if arptype == ARPHRD_LOOPBACK or name == "lo":
        return result("other", False, "loopback")
    if os.path.isdir(base / "bridge") or devtype == "bridge":
        return result("other", False, _virtual_reason(name, "bridge"))
    if os.path.isdir(base / "bonding") or devtype == "bond":
        return result("other", False, "bonding master")
    if os.path.lexists(base / "tun_flags"):
        return result("other", False, _virtual_reason(name, "tun/tap"))

    wifi = devtype == "wlan" or any(
        os.path.lexists(base / entry) for entry in ("wireless", "phy80211")
    )
    cellular = _cellular_reason(name, devtype, driver, device_dir, sysfs)
    if wifi:
        kind, why = "wifi", f"Wi-Fi ({_driver_phrase(driver, devtype)})"
    elif cellular is not None:
        kind, why = "cellular", cellular
    else:
        kind, why = "other", ""

    if virtual:
        # A virtual Wi-Fi (mac80211_hwsim) keeps its kind but is still not offered as a link.
        what = VIRTUAL_DEVTYPES.get(devtype or "") or (why if kind != "other" else None)
        return result(kind, False, _virtual_reason(name, what))
    if devtype in VIRTUAL_DEVTYPES:
        # A VLAN or macvlan may sit on a real device's parent; it is not a link of its own.
        return result("other", False, VIRTUAL_DEVTYPES[devtype])
    if arptype in NON_IP_TYPES:
        return result(kind, False, NON_IP_TYPES[arptype])
    if kind != "other":
        return result(kind, True, why)
    if arptype == ARPHRD_ETHER:
        if driver in USB_ETHERNET_DRIVERS:
            return result("ethernet", True, f"driver {driver} (USB Ethernet adapter)")
        adapter = _usb_adapter_hint(device_dir, sysfs) if driver else None
        if adapter is not None:
            return result("ethernet", True, f"driver {driver} on {adapter} (USB Ethernet adapter)")
        return result("ethernet", True, f"Ethernet ({_driver_phrase(driver, devtype)})")
    return result("other", True, f"unknown link type {arptype} ({_driver_phrase(driver, devtype)})")


def classify_all(sysfs: Path = Path("/sys")) -> list[Classification]:
    """Every interface in ``<sysfs>/class/net``, sorted by name."""
    try:
        names = sorted(entry.name for entry in (sysfs / "class" / "net").iterdir())
    except OSError:
        return []
    return [classify(name, sysfs) for name in names]


class CachedClassifier:
    """:func:`classify_all`, remembering each interface while it exists.

    braidd looks every second; an interface's driver and place in the device tree do not change
    while it lives, so it is classified again only when its index (a new interface of the same
    name) or its type (Wi-Fi switched to monitor mode) changes: two small reads per interface
    instead of a walk of its sysfs directory.
    """

    def __init__(self, sysfs: Path = Path("/sys")) -> None:
        self.sysfs = sysfs
        self._known: dict[tuple[str, int, int | None], Classification] = {}

    def classify_all(self) -> list[Classification]:
        try:
            names = sorted(entry.name for entry in (self.sysfs / "class" / "net").iterdir())
        except OSError:
            return []
        known: dict[tuple[str, int, int | None], Classification] = {}
        out = []
        for name in names:
            base = self.sysfs / "class" / "net" / name
            index = _read_int(base / "ifindex")
            if index is None:  # vanished, or a made-up tree without it: no caching
                out.append(classify(name, self.sysfs))
                continue
            key = (name, index, _read_int(base / "type"))
            found = self._known.get(key) or classify(name, self.sysfs)
            known[key] = found
            out.append(found)
        self._known = known
        return out


def _other(name: str, is_link: bool, reason: str) -> Classification:
    return Classification(name, "other", is_link, None, reason, None, None)


def _cellular_reason(
    name: str,
    devtype: str | None,
    driver: str | None,
    device_dir: tuple[str, ...] | None,
    sysfs: Path,
) -> str | None:
    """Why this looks like a phone or modem, or None when it does not."""
    if driver in CELLULAR_DRIVERS:
        if driver in ADAPTER_AMBIGUOUS_DRIVERS and _usb_adapter_hint(device_dir, sysfs):
            return None
        return f"driver {driver} ({CELLULAR_DRIVERS[driver]})"
    if devtype == "wwan":
        return f"WWAN modem ({_driver_phrase(driver, devtype)})"
    # The MHI bus (mhi0/, mhi0_IP_HW0/…) sits between a PCIe modem and its net device.
    if device_dir is not None and any(part.startswith("mhi") for part in device_dir[:-2]):
        return f"PCIe modem over MHI ({_driver_phrase(driver, devtype)})"
    if devtype == "bluetooth" or name.startswith("bnep"):
        return "Bluetooth tethering (PAN)"
    return None


def _driver_phrase(driver: str | None, devtype: str | None) -> str:
    if driver:
        return f"driver {driver}"
    if devtype:
        return f"DEVTYPE={devtype}"
    return "no driver"


def _virtual_reason(name: str, what: str | None) -> str:
    if what is None:
        what = next((hint for prefix, hint in VIRTUAL_NAME_HINTS if name.startswith(prefix)), None)
    return f"virtual device: {what}" if what else "virtual device"


def _device_path(base: Path, sysfs: Path) -> tuple[str, ...] | None:
    """Where the interface really lives below sysfs (``devices/...``), as path parts.

    ``class/net/<name>`` is a symlink into ``devices/``: the parts say whether
    the device is virtual and what buses lead to it (USB, MHI, Bluetooth).
    """
    try:
        real = Path(os.path.realpath(base))
        return real.relative_to(os.path.realpath(sysfs)).parts
    except (OSError, ValueError):
        return None


def _driver(device: Path) -> str | None:
    """The parent device's driver: the ``driver`` symlink's name, else DRIVER= in its uevent."""
    link = device / "driver"
    if os.path.lexists(link):
        try:
            return Path(os.readlink(link)).name or None
        except OSError:
            pass
    return _read_uevent(device / "uevent").get("DRIVER") or None


def _usb_adapter_hint(device_dir: tuple[str, ...] | None, sysfs: Path) -> str | None:
    """The maker of a USB device that looks like an Ethernet adapter or dock, else None.

    The USB device (with ``idVendor``) is the parent of the USB interface that
    the net device hangs from: look a few levels up from the net device.
    """
    if device_dir is None:
        return None
    # device_dir ends in .../<usb interface>/net/<name>
    for depth in range(3, min(6, len(device_dir)) + 1):
        candidate = sysfs.joinpath(*device_dir[:-depth])
        vendor = _read_text(candidate / "idVendor")
        if vendor is None:
            continue
        vendor = vendor.lower()
        if vendor in ETHERNET_ADAPTER_VENDORS:
            return ETHERNET_ADAPTER_VENDORS[vendor]
        product = (_read_text(candidate / "product") or "").lower()
        if any(word in f" {product} " for word in ADAPTER_PRODUCT_WORDS):
            return f"“{_read_text(candidate / 'product')}”"
        return None
    return None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    try:
        return int(text, 0) if text else None
    except ValueError:
        return None


def _read_uevent(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in (_read_text(path) or "").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    return values
