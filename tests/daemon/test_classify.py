"""Interface classification against made-up sysfs trees laid out like real ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from braid.daemon.links import classify as classify_module
from braid.daemon.links.classify import Classification, classify, classify_all

PCI = "pci0000:00"
USB_HOST = f"{PCI}/0000:00:14.0/usb1"


class FakeSysfs:
    """Builds the parts of /sys that classification reads.

    ``class/net/<name>`` is a relative symlink to ``devices/<parent>/net/<name>``
    (``devices/virtual/net/<name>`` without a parent), ``device`` points at the
    parent and the parent's ``driver`` at ``bus/<bus>/drivers/<driver>``, as
    the kernel lays them out.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "class" / "net").mkdir(parents=True)

    def device(
        self,
        path: str,
        *,
        driver: str | None = None,
        bus: str = "pci",
        files: dict[str, str] | None = None,
    ) -> Path:
        """A parent device at ``devices/<path>``, bound to *driver* on *bus*."""
        where = self.root / "devices" / path
        where.mkdir(parents=True, exist_ok=True)
        if driver:
            target = self.root / "bus" / bus / "drivers" / driver
            target.mkdir(parents=True, exist_ok=True)
            self._link(where / "driver", target)
        uevent = f"DRIVER={driver}\n" if driver else ""
        (where / "uevent").write_text(uevent)
        for name, text in (files or {}).items():
            (where / name).write_text(text)
        return where

    def usb(self, port: str, *, driver: str, vendor: str = "18d1", product: str = "Pixel 7") -> str:
        """A USB device on *port* with interface ``<port>:1.0`` bound to *driver*."""
        self.device(
            f"{USB_HOST}/{port}", files={"idVendor": f"{vendor}\n", "product": f"{product}\n"}
        )
        interface = f"{USB_HOST}/{port}/{port}:1.0"
        self.device(interface, driver=driver, bus="usb")
        return interface

    def net(
        self,
        name: str,
        parent: str | None = None,
        *,
        arptype: int = 1,
        devtype: str | None = None,
        dirs: tuple[str, ...] = (),
        files: tuple[str, ...] = (),
        phy: bool = False,
    ) -> Path:
        """A net device under *parent* (a path below ``devices/``; None for virtual)."""
        home = self.root / "devices" / (parent or "virtual") / "net" / name
        home.mkdir(parents=True)
        (home / "type").write_text(f"{arptype}\n")
        uevent = f"DEVTYPE={devtype}\n" if devtype else ""
        (home / "uevent").write_text(f"{uevent}INTERFACE={name}\nIFINDEX=7\n")
        if parent is not None:
            self._link(home / "device", self.root / "devices" / parent)
        for entry in dirs:
            (home / entry).mkdir()
        for entry in files:
            (home / entry).write_text("0x1002\n")
        if phy:
            wiphy = self.root / "devices" / parent / "ieee80211" / "phy0"
            wiphy.mkdir(parents=True)
            self._link(home / "phy80211", wiphy)
        self._link(self.root / "class" / "net" / name, home)
        return home

    @staticmethod
    def _link(link: Path, target: Path) -> None:
        link.symlink_to(os.path.relpath(target, link.parent))


@pytest.fixture
def sysfs(tmp_path: Path) -> FakeSysfs:
    return FakeSysfs(tmp_path / "sys")


def check(sysfs: FakeSysfs, name: str, kind: str, is_link: bool) -> Classification:
    found = classify(name, sysfs.root)
    assert (found.kind, found.is_link) == (kind, is_link), found
    assert found.name == name
    assert found.reason
    return found


def test_onboard_ethernet(sysfs: FakeSysfs) -> None:
    sysfs.device(f"{PCI}/0000:00:1f.6", driver="e1000e")
    sysfs.net("enp0s31f6", f"{PCI}/0000:00:1f.6")
    found = check(sysfs, "enp0s31f6", "ethernet", True)
    assert found.driver == "e1000e"
    assert found.metered is None
    assert "e1000e" in found.reason


def test_virtio_ethernet_in_a_virtual_machine(sysfs: FakeSysfs) -> None:
    sysfs.device(f"{PCI}/0000:00:03.0", driver="virtio-pci")
    sysfs.device(f"{PCI}/0000:00:03.0/virtio2", driver="virtio_net", bus="virtio")
    sysfs.net("eth0", f"{PCI}/0000:00:03.0/virtio2")
    assert check(sysfs, "eth0", "ethernet", True).driver == "virtio_net"


def test_intel_wifi(sysfs: FakeSysfs) -> None:
    sysfs.device(f"{PCI}/0000:00:14.3", driver="iwlwifi")
    sysfs.net("wlp0s20f3", f"{PCI}/0000:00:14.3", devtype="wlan", phy=True)
    found = check(sysfs, "wlp0s20f3", "wifi", True)
    assert found.devtype == "wlan"
    assert found.driver == "iwlwifi"
    assert found.metered is None


def test_wifi_known_by_its_wireless_entry_alone(sysfs: FakeSysfs) -> None:
    sysfs.device(f"{USB_HOST}/1-4/1-4:1.0", driver="mt76x2u", bus="usb")
    sysfs.net("wlx00c0ca", f"{USB_HOST}/1-4/1-4:1.0", dirs=("wireless",))
    check(sysfs, "wlx00c0ca", "wifi", True)


def test_wifi_in_monitor_mode_is_not_a_link(sysfs: FakeSysfs) -> None:
    sysfs.device(f"{PCI}/0000:00:14.3", driver="iwlwifi")
    sysfs.net("mon0", f"{PCI}/0000:00:14.3", arptype=803, devtype="wlan", phy=True)
    check(sysfs, "mon0", "wifi", False)


@pytest.mark.parametrize(
    ("driver", "words"),
    [
        ("rndis_host", "USB tethering"),
        ("cdc_ncm", "USB tethering"),
        ("cdc_ether", "USB tethering"),
        ("ipheth", "iPhone"),
    ],
)
def test_tethered_phone(sysfs: FakeSysfs, driver: str, words: str) -> None:
    sysfs.net("usb0", sysfs.usb("1-2", driver=driver))
    found = check(sysfs, "usb0", "cellular", True)
    assert found.driver == driver
    assert found.metered is True
    assert driver in found.reason
    assert words in found.reason


def test_iphone_by_vendor(sysfs: FakeSysfs) -> None:
    interface = sysfs.usb("1-3", driver="ipheth", vendor="05ac", product="iPhone")
    sysfs.net("enx1e2f", interface)
    assert "iPhone tethering" in check(sysfs, "enx1e2f", "cellular", True).reason


def test_qmi_modem(sysfs: FakeSysfs) -> None:
    interface = sysfs.usb("2-3", driver="qmi_wwan", vendor="1199", product="EM7455")
    sysfs.net("wwan0", interface, arptype=65534, devtype="wwan")
    found = check(sysfs, "wwan0", "cellular", True)
    assert (found.driver, found.devtype, found.metered) == ("qmi_wwan", "wwan", True)


def test_mbim_modem(sysfs: FakeSysfs) -> None:
    interface = sysfs.usb("2-4", driver="cdc_mbim", vendor="2c7c", product="EM120R-GL")
    sysfs.net("wwp0s20f0u4i12", interface, arptype=65534)
    assert "MBIM" in check(sysfs, "wwp0s20f0u4i12", "cellular", True).reason


def test_wwan_devtype_without_a_driver(sysfs: FakeSysfs) -> None:
    # mhi_wwan_mbim: the net device hangs from a wwan class device, which has no driver.
    sysfs.device(f"{PCI}/0000:00:1c.0/0000:02:00.0", driver="mhi-pci-generic")
    sysfs.device(f"{PCI}/0000:00:1c.0/0000:02:00.0/wwan0")
    sysfs.net("wwan0", f"{PCI}/0000:00:1c.0/0000:02:00.0/wwan0", arptype=65534, devtype="wwan")
    found = check(sysfs, "wwan0", "cellular", True)
    assert found.driver is None
    assert "wwan" in found.reason.lower()


def test_mhi_modem(sysfs: FakeSysfs) -> None:
    modem = f"{PCI}/0000:00:1c.0/0000:02:00.0"
    sysfs.device(modem, driver="mhi-pci-generic")
    sysfs.device(f"{modem}/mhi0")
    sysfs.device(f"{modem}/mhi0/mhi0_IP_HW0", driver="mhi_net", bus="mhi")
    sysfs.net("mhi_hwip0", f"{modem}/mhi0/mhi0_IP_HW0", arptype=519)
    found = check(sysfs, "mhi_hwip0", "cellular", True)
    assert found.driver == "mhi_net"


def test_mhi_path_alone_says_modem(sysfs: FakeSysfs) -> None:
    modem = f"{PCI}/0000:00:1c.0/0000:02:00.0"
    sysfs.device(f"{modem}/mhi0/mhi0_IP_SW0")
    sysfs.net("mhi_swip0", f"{modem}/mhi0/mhi0_IP_SW0", arptype=519)
    assert "MHI" in check(sysfs, "mhi_swip0", "cellular", True).reason


def test_bluetooth_pan(sysfs: FakeSysfs) -> None:
    sysfs.device(f"{USB_HOST}/1-10/1-10:1.0", driver="btusb", bus="usb")
    connection = f"{USB_HOST}/1-10/1-10:1.0/bluetooth/hci0/hci0:256"
    sysfs.device(connection)
    sysfs.net("bnep0", connection, devtype="bluetooth")
    found = check(sysfs, "bnep0", "cellular", True)
    assert "Bluetooth" in found.reason
    assert found.metered is True


@pytest.mark.parametrize("driver", ["r8152", "ax88179_178a", "asix"])
def test_usb_ethernet_adapter_is_not_a_phone(sysfs: FakeSysfs, driver: str) -> None:
    interface = sysfs.usb("1-1", driver=driver, vendor="0bda", product="USB 10/100/1000 LAN")
    sysfs.net("enx00e04c680001", interface)
    found = check(sysfs, "enx00e04c680001", "ethernet", True)
    assert "adapter" in found.reason
    assert found.metered is None


def test_cdc_ncm_ethernet_adapter_by_vendor(sysfs: FakeSysfs) -> None:
    interface = sysfs.usb("1-1", driver="cdc_ncm", vendor="0bda", product="USB 10/100/1G/2.5G LAN")
    sysfs.net("enx00e04c680002", interface)
    found = check(sysfs, "enx00e04c680002", "ethernet", True)
    assert "Realtek" in found.reason


def test_cdc_ether_dock_by_product_name(sysfs: FakeSysfs) -> None:
    interface = sysfs.usb("1-1", driver="cdc_ether", vendor="1234", product="USB-C Dock Ethernet")
    sysfs.net("enx00e04c680003", interface)
    check(sysfs, "enx00e04c680003", "ethernet", True)


def test_docker_bridge(sysfs: FakeSysfs) -> None:
    sysfs.net("docker0", devtype="bridge", dirs=("bridge",))
    found = check(sysfs, "docker0", "other", False)
    assert "bridge" in found.reason


def test_bridge_with_a_name_of_its_own(sysfs: FakeSysfs) -> None:
    sysfs.net("br-5f2a", dirs=("bridge",))
    check(sysfs, "br-5f2a", "other", False)


def test_veth(sysfs: FakeSysfs) -> None:
    sysfs.net("veth1a2b3c")
    assert "veth" in check(sysfs, "veth1a2b3c", "other", False).reason


def test_veth_named_like_a_laptop_link_is_still_virtual(sysfs: FakeSysfs) -> None:
    sysfs.net("eth0")
    check(sysfs, "eth0", "other", False)


def test_tun(sysfs: FakeSysfs) -> None:
    sysfs.net("tun0", arptype=65534, files=("tun_flags",))
    assert "tun" in check(sysfs, "tun0", "other", False).reason


def test_loopback(sysfs: FakeSysfs) -> None:
    sysfs.net("lo", arptype=772)
    assert check(sysfs, "lo", "other", False).reason == "loopback"


def test_wireguard(sysfs: FakeSysfs) -> None:
    sysfs.net("wg0", arptype=65534, devtype="wireguard")
    assert "WireGuard" in check(sysfs, "wg0", "other", False).reason


def test_bond_master(sysfs: FakeSysfs) -> None:
    sysfs.net("bond0", devtype="bond", dirs=("bonding",))
    check(sysfs, "bond0", "other", False)


def test_vlan(sysfs: FakeSysfs) -> None:
    sysfs.net("eth0.100", devtype="vlan")
    check(sysfs, "eth0.100", "other", False)


def test_simulated_wifi_keeps_its_kind_but_is_not_a_link(sysfs: FakeSysfs) -> None:
    # mac80211_hwsim radios have a parent, but under devices/virtual.
    sysfs.device("virtual/mac80211_hwsim/hwsim0")
    sysfs.net("wlan0", "virtual/mac80211_hwsim/hwsim0", devtype="wlan", phy=True)
    check(sysfs, "wlan0", "wifi", False)


def test_physical_device_of_unknown_type(sysfs: FakeSysfs) -> None:
    sysfs.device(f"{PCI}/0000:03:00.0", driver="mlx5_core")
    sysfs.net("ib0", f"{PCI}/0000:03:00.0", arptype=32)
    assert check(sysfs, "ib0", "other", True).driver == "mlx5_core"


def test_can_bus_is_not_a_link(sysfs: FakeSysfs) -> None:
    sysfs.device(f"{USB_HOST}/1-5/1-5:1.0", driver="gs_usb", bus="usb")
    sysfs.net("can0", f"{USB_HOST}/1-5/1-5:1.0", arptype=280)
    check(sysfs, "can0", "other", False)


def test_driver_from_the_parent_uevent_when_the_link_is_missing(sysfs: FakeSysfs) -> None:
    parent = sysfs.device(f"{PCI}/0000:00:1f.6")
    (parent / "uevent").write_text("DRIVER=igc\nPCI_ID=8086:15F3\n")
    sysfs.net("enp0s31f6", f"{PCI}/0000:00:1f.6")
    assert check(sysfs, "enp0s31f6", "ethernet", True).driver == "igc"


@pytest.mark.parametrize("name", ["nosuch0", "", "..", "../../etc"])
def test_missing_or_odd_names_are_not_links(sysfs: FakeSysfs, name: str) -> None:
    found = classify(name, sysfs.root)
    assert (found.kind, found.is_link) == ("other", False)


def test_classify_all_lists_every_interface_in_order(sysfs: FakeSysfs) -> None:
    sysfs.device(f"{PCI}/0000:00:1f.6", driver="e1000e")
    sysfs.net("enp0s31f6", f"{PCI}/0000:00:1f.6")
    sysfs.net("lo", arptype=772)
    sysfs.net("usb0", sysfs.usb("1-2", driver="rndis_host"))
    found = classify_all(sysfs.root)
    assert [(c.name, c.kind, c.is_link) for c in found] == [
        ("enp0s31f6", "ethernet", True),
        ("lo", "other", False),
        ("usb0", "cellular", True),
    ]


def test_classify_all_without_sysfs(tmp_path: Path) -> None:
    assert classify_all(tmp_path / "nothing") == []


def test_real_sysfs_does_not_crash() -> None:
    found = classify_all()
    for item in found:
        assert isinstance(item, Classification)
        assert item.kind in ("ethernet", "wifi", "cellular", "other")
        assert item.reason
    names = {item.name for item in found}
    if "lo" in names:
        assert not next(item for item in found if item.name == "lo").is_link


def test_cached_classifier_reads_an_interface_again_only_when_it_changes(
    tmp_path: Path, monkeypatch
) -> None:
    base = tmp_path / "class" / "net" / "wlan0"
    base.mkdir(parents=True)
    (base / "ifindex").write_text("3\n")
    (base / "type").write_text("1\n")
    calls: list[str] = []
    real = classify_module.classify

    def counting(name: str, sysfs: Path) -> Classification:
        calls.append(name)
        return real(name, sysfs)

    monkeypatch.setattr(classify_module, "classify", counting)
    cached = classify_module.CachedClassifier(tmp_path)
    first = cached.classify_all()
    assert cached.classify_all() == first and calls == ["wlan0"]
    (base / "type").write_text("803\n")  # switched to monitor mode
    cached.classify_all()
    assert calls == ["wlan0", "wlan0"]
    (base / "ifindex").write_text("9\n")  # unplugged and plugged again
    cached.classify_all()
    assert calls == ["wlan0", "wlan0", "wlan0"]
