"""NetworkManager's view: property parsing, merging, and reading over a real (private) bus."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from braid.daemon.links.classify import Classification
from braid.daemon.links.networkmanager import (
    NM_BUS_NAME,
    NM_PATH,
    NmDevice,
    NmView,
    connectivity_of,
    merge,
    parse_device,
    parse_devices,
    read_devices,
    read_view,
    unwrap_variants,
)

# --- parsing --------------------------------------------------------------------------------


def test_ethernet_device() -> None:
    device = parse_device({"Interface": "enp0s31f6", "DeviceType": 1, "Metered": 4})
    assert device == NmDevice("enp0s31f6", "ethernet", False, 1)


def test_wifi_device_metered_by_the_user() -> None:
    device = parse_device(
        {"Interface": "wlp0s20f3", "IpInterface": "wlp0s20f3", "DeviceType": 2, "Metered": 1}
    )
    assert device == NmDevice("wlp0s20f3", "wifi", True, 2)


def test_modem_is_keyed_by_its_ip_interface() -> None:
    device = parse_device(
        {"Interface": "cdc-wdm0", "IpInterface": "wwan0", "DeviceType": 8, "Metered": 3}
    )
    assert device == NmDevice("wwan0", "cellular", True, 8)


def test_bluetooth_device() -> None:
    device = parse_device(
        {"Interface": "AA:BB:CC:DD:EE:FF", "IpInterface": "bnep0", "DeviceType": 5}
    )
    assert device == NmDevice("bnep0", "cellular", None, 5)


def test_disconnected_modem_falls_back_to_its_interface() -> None:
    device = parse_device({"Interface": "cdc-wdm0", "IpInterface": "", "DeviceType": 8})
    assert device is not None
    assert device.name == "cdc-wdm0"


@pytest.mark.parametrize(
    ("device_type", "kind"),
    [(13, "other"), (20, "other"), (29, "other"), (32, "other"), (0, None), (999, "other")],
)
def test_other_device_types(device_type: int, kind: str | None) -> None:
    device = parse_device({"Interface": "x0", "DeviceType": device_type, "Metered": 0})
    assert device == NmDevice("x0", kind, None, device_type)


@pytest.mark.parametrize(
    ("metered", "expected"), [(0, None), (1, True), (2, False), (3, True), (4, False), (9, None)]
)
def test_metered_values(metered: int, expected: bool | None) -> None:
    device = parse_device({"Interface": "x0", "DeviceType": 1, "Metered": metered})
    assert device is not None
    assert device.metered is expected


def test_odd_property_values_do_not_raise() -> None:
    assert parse_device({}) is None
    assert parse_device({"Interface": 5, "IpInterface": None}) is None
    device = parse_device({"Interface": "x0", "DeviceType": "1", "Metered": True})
    assert device == NmDevice("x0", None, None, 0)


@pytest.mark.parametrize(
    ("ip4", "ip6", "expected"),
    [
        (2, 1, "portal"),  # IPv4 behind a captive portal, no IPv6
        (4, 2, "full"),  # IPv6 reaches the internet: the better family wins
        (3, 0, "limited"),
        (1, 1, "none"),
        (0, 0, None),  # NM has not checked, or its check is off
        (None, None, None),  # NM older than 1.16: no such properties
        ("4", True, None),  # not numbers
    ],
)
def test_connectivity(ip4: Any, ip6: Any, expected: str | None) -> None:
    assert connectivity_of(ip4, ip6) == expected


def test_device_behind_a_captive_portal() -> None:
    device = parse_device(
        {"Interface": "wlan0", "DeviceType": 2, "Ip4Connectivity": 2, "Ip6Connectivity": 1}
    )
    assert device == NmDevice("wlan0", "wifi", None, 2, "portal")


def test_parse_devices_by_name() -> None:
    devices = parse_devices(
        [
            {"Interface": "lo", "DeviceType": 32, "Metered": 0},
            {"Interface": "p2p-dev-wlp0s20f3", "IpInterface": "", "DeviceType": 30},
            {"Interface": "", "DeviceType": 8},
            {"Interface": "usb0", "DeviceType": 1, "Metered": 3},
        ]
    )
    assert sorted(devices) == ["lo", "p2p-dev-wlp0s20f3", "usb0"]
    assert devices["usb0"] == NmDevice("usb0", "ethernet", True, 1)


def test_unwrap_variants() -> None:
    assert unwrap_variants({"Interface": ("s", "eth0"), "DeviceType": ("u", 1)}) == {
        "Interface": "eth0",
        "DeviceType": 1,
    }


# --- merging --------------------------------------------------------------------------------


def classified(
    kind: str, is_link: bool = True, metered: bool | None = None, name: str = "x0"
) -> Classification:
    return Classification(name, kind, is_link, metered, "from sysfs", "drv", None)


def test_merge_without_nm_changes_nothing() -> None:
    sysfs = classified("ethernet")
    assert merge(sysfs, None) is sysfs


def test_modem_makes_cellular() -> None:
    merged = merge(classified("other"), NmDevice("x0", "cellular", True, 8))
    assert (merged.kind, merged.is_link, merged.metered) == ("cellular", True, True)
    assert "modem" in merged.reason
    assert merged.reason.startswith("from sysfs")


def test_modem_on_a_virtual_interface_is_a_link() -> None:
    merged = merge(classified("other", is_link=False), NmDevice("x0", "cellular", None, 8))
    assert (merged.kind, merged.is_link) == ("cellular", True)


def test_wifi_makes_wifi() -> None:
    merged = merge(classified("other"), NmDevice("x0", "wifi", None, 2))
    assert merged.kind == "wifi"


def test_nm_ethernet_does_not_override_a_tethered_phone() -> None:
    # NM lists rndis_host/cdc_ncm phones as plain Ethernet devices.
    merged = merge(classified("cellular", metered=True), NmDevice("x0", "ethernet", None, 1))
    assert (merged.kind, merged.metered) == ("cellular", True)


def test_nm_ethernet_names_a_physical_other() -> None:
    assert merge(classified("other"), NmDevice("x0", "ethernet", None, 1)).kind == "ethernet"


def test_nm_ethernet_does_not_make_a_virtual_device_a_link() -> None:
    merged = merge(classified("other", is_link=False), NmDevice("x0", "ethernet", None, 1))
    assert (merged.kind, merged.is_link) == ("other", False)


def test_virtual_nm_types_change_nothing() -> None:
    sysfs = classified("other", is_link=False)
    assert merge(sysfs, NmDevice("x0", "other", None, 13)) == sysfs


@pytest.mark.parametrize(
    ("kind", "guess", "nm_metered", "expected"),
    [
        ("ethernet", None, True, True),  # an Android hotspot's DHCP option, or the user
        ("wifi", None, True, True),
        ("wifi", None, False, False),
        ("cellular", True, False, False),  # the user said an unlimited plan is not metered
        ("cellular", True, None, True),  # NM unknown keeps the guess from the kind
        ("ethernet", None, None, None),
    ],
)
def test_nm_metered_wins_over_the_guess(
    kind: str, guess: bool | None, nm_metered: bool | None, expected: bool | None
) -> None:
    merged = merge(classified(kind, metered=guess), NmDevice("x0", None, nm_metered, 0))
    assert merged.metered is expected
    assert merged.kind == kind


# --- reading over D-Bus ---------------------------------------------------------------------


def test_no_system_bus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-such-socket")
    started = time.monotonic()
    assert read_devices() is None
    assert time.monotonic() - started < 1.0


def test_garbage_bus_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "nonsense")
    assert read_devices() is None


@pytest.fixture
def private_bus(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A dbus-daemon of the test's own, standing in for the system bus."""
    if shutil.which("dbus-daemon") is None:
        pytest.skip("needs dbus-daemon")
    # A short directory: unix socket paths are limited to about 100 bytes.
    with tempfile.TemporaryDirectory(prefix="braid-bus-") as directory:
        process = subprocess.Popen(
            [
                "dbus-daemon",
                "--session",
                "--nofork",
                "--print-address=1",
                f"--address=unix:path={directory}/bus",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stdout is not None
            address = process.stdout.readline().strip()
            assert address.startswith("unix:")
            monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)
            yield address
        finally:
            process.terminate()
            process.wait(timeout=5)


class FakeNetworkManager:
    """Answers GetDevices and the devices' GetAll the way NetworkManager does."""

    def __init__(self, address: str, devices: dict[str, dict[str, tuple[str, Any]]]) -> None:
        from jeepney.bus_messages import message_bus
        from jeepney.io.blocking import open_dbus_connection

        self.devices = devices
        self.listed = list(devices)
        self.connectivity: tuple[str, Any] | None = None  # the manager's; None: no property
        self.silent = False
        self.conn = open_dbus_connection(bus=address)
        self.conn.send_and_get_reply(message_bus.RequestName(NM_BUS_NAME), timeout=5)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        from jeepney import HeaderFields, MessageType, new_error, new_method_return

        while not self.stop.is_set():
            try:
                msg = self.conn.receive(timeout=0.05)
            except TimeoutError:
                continue
            if msg.header.message_type != MessageType.method_call or self.silent:
                continue
            member = msg.header.fields.get(HeaderFields.member)
            path = msg.header.fields.get(HeaderFields.path)
            if member == "GetDevices":
                self.conn.send(new_method_return(msg, "ao", (self.listed,)))
            elif member == "GetAll" and path in self.devices:
                self.conn.send(new_method_return(msg, "a{sv}", (self.devices[path],)))
            elif member == "Get" and path == NM_PATH and self.connectivity is not None:
                self.conn.send(new_method_return(msg, "v", (self.connectivity,)))
            else:
                error = "org.freedesktop.DBus.Error.UnknownObject"
                self.conn.send(new_error(msg, error, "s", (f"no {path}",)))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.conn.close()


@pytest.fixture
def fake_nm(private_bus: str) -> Iterator[FakeNetworkManager]:
    base = "/org/freedesktop/NetworkManager/Devices"
    nm = FakeNetworkManager(
        private_bus,
        {
            f"{base}/1": {
                "Interface": ("s", "lo"),
                "IpInterface": ("s", "lo"),
                "DeviceType": ("u", 32),
                "Metered": ("u", 0),
            },
            f"{base}/2": {
                "Interface": ("s", "wlp0s20f3"),
                "IpInterface": ("s", "wlp0s20f3"),
                "DeviceType": ("u", 2),
                "Metered": ("u", 4),
                "Driver": ("s", "iwlwifi"),
                "Ip4Connectivity": ("u", 2),
                "Ip6Connectivity": ("u", 1),
            },
            f"{base}/3": {
                "Interface": ("s", "cdc-wdm0"),
                "IpInterface": ("s", "wwan0"),
                "DeviceType": ("u", 8),
                "Metered": ("u", 3),
            },
        },
    )
    yield nm
    nm.close()


def test_read_devices_from_networkmanager(fake_nm: FakeNetworkManager) -> None:
    assert read_devices() == {
        "lo": NmDevice("lo", "other", None, 32),
        "wlp0s20f3": NmDevice("wlp0s20f3", "wifi", False, 2, "portal"),
        "wwan0": NmDevice("wwan0", "cellular", True, 8),
    }


def test_read_the_global_connectivity(fake_nm: FakeNetworkManager) -> None:
    fake_nm.connectivity = ("u", 2)
    view = read_view()
    assert isinstance(view, NmView)
    assert view.connectivity == "portal"
    assert view.devices["wlp0s20f3"].connectivity == "portal"


def test_no_global_connectivity_is_unknown(fake_nm: FakeNetworkManager) -> None:
    view = read_view()
    assert view is not None and view.connectivity is None


def test_a_device_that_vanished_is_skipped(fake_nm: FakeNetworkManager) -> None:
    fake_nm.listed.append("/org/freedesktop/NetworkManager/Devices/9")
    assert sorted(read_devices() or {}) == ["lo", "wlp0s20f3", "wwan0"]


def test_bus_without_networkmanager(private_bus: str) -> None:
    assert read_devices() is None


def test_networkmanager_that_does_not_answer(fake_nm: FakeNetworkManager) -> None:
    fake_nm.silent = True
    started = time.monotonic()
    assert read_devices(timeout=0.3) is None
    assert time.monotonic() - started < 2.0
