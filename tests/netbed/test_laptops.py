"""A world with several laptops (``World(..., laptops=3)``): addresses, reachability, shaping,
blackholes and link changes for the extra laptops, and their teardown."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from braid.netbed import LinkSpec, World, traffic, unavailable_reason
from braid.netbed.nsutil import NETNS_ETC_DIR, list_netns

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason())),
]

EXTRA = [2, 3]
#: The shaping subject is wlan0 (20 Mbit/s); no delays, which only the first laptop has.
LINKS = [
    LinkSpec("eth0", "ethernet", rate_mbit=50),
    LinkSpec("wlan0", "wifi", rate_mbit=20),
    LinkSpec("usb0", "cellular", rate_mbit=30),
]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with World(LINKS, laptops=3) as w:
        yield w


def _echo(world: World, laptop: int, link: str, family: int = 4, **kw) -> traffic.EchoResult:
    kw = {"count": 3, "interval": 0.02, "timeout": 0.5, **kw}
    target = world.target_v4 if family == 4 else world.target_v6
    with world.enter(world.laptop_role(laptop)):
        return traffic.echo(target, world.echo_port, device=link, **kw)


def test_one_laptop_by_default_and_at_most_nine() -> None:
    links = [LinkSpec("eth0", "ethernet", None)]
    assert World(links).roles() == ["laptop", "server", "inet", "isp-1", "wire-1"]
    assert World(links).laptop_roles() == ["laptop"]
    assert World(links, laptops=3).roles()[-2:] == ["laptop-2", "laptop-3"]
    for bad in (0, 10):
        with pytest.raises(ValueError):
            World(links, laptops=bad)
    with pytest.raises(KeyError):
        World(links).laptop_addr("eth0", laptop=2)


def test_extra_laptops_are_built_and_removed() -> None:
    with World([LinkSpec("eth0", "ethernet", None)], laptops=2) as world:
        names = [name for name in list_netns() if name.startswith(world.prefix)]
        assert sorted(names) == sorted(world.ns(role) for role in world.roles())
        etc = NETNS_ETC_DIR / world.ns("laptop-2")
        assert (etc / "hosts").read_text() == (
            NETNS_ETC_DIR / world.ns("laptop") / "hosts"
        ).read_text()
        if Path("/etc/resolv.conf").exists():
            assert f"nameserver {world.laptop_resolver}\n" in (etc / "resolv.conf").read_text()
    assert [name for name in list_netns() if name.startswith(world.prefix)] == []
    assert not etc.exists()


def test_no_address_is_used_twice(world: World) -> None:
    seen: dict[str, str] = {}
    for role in world.roles():
        for dev in json.loads(world.run(role, ["ip", "-j", "address", "show"]).stdout):
            for info in dev.get("addr_info", []):
                address = ipaddress.ip_address(info["local"])
                if address.is_loopback or address.is_link_local:
                    continue
                where = f"{role}/{dev['ifname']}"
                assert str(address) not in seen, (address, seen.get(str(address)), where)
                seen[str(address)] = where
                net = ipaddress.ip_network(
                    "198.18.0.0/15" if address.version == 4 else "2001:db8::/32"
                )
                assert address in net, where
    for k in (1, *EXTRA):
        for link in world.links:
            assert seen[world.laptop_addr(link.name, 4, k)] == f"{world.laptop_role(k)}/{link.name}"
            assert seen[world.laptop_addr(link.name, 6, k)] == f"{world.laptop_role(k)}/{link.name}"
            assert seen[world.gateway(link.name, 4, k)].startswith(
                f"isp-{world.link_index(link.name)}/"
            )


@pytest.mark.parametrize("laptop", EXTRA)
@pytest.mark.parametrize("family", [4, 6])
def test_extra_laptops_download_through_each_link(world: World, laptop: int, family: int) -> None:
    target = world.target_v4 if family == 4 else world.target_v6
    for link in world.links:
        source = world.laptop_addr(link.name, family, laptop)
        rx_before, _ = world.counters(link.name, laptop)
        seed = f"{laptop}{link.name}{family}"
        with world.enter(world.laptop_role(laptop)):
            result = traffic.download(
                target, world.http_port, 100_000, seed, bind=source, device=link.name
            )
        assert result.ok, result
        assert result.local == source
        assert world.counters(link.name, laptop)[0] - rx_before >= 100_000
        entry = world.wait_access(lambda e, s=seed: e["path"] == f"/bytes/100000?seed={s}")
        assert entry["client"] == source


def test_the_isp_drops_a_source_address_of_another_link(world: World) -> None:
    with world.enter("laptop-2"):
        result = traffic.echo(
            world.target_v4,
            world.echo_port,
            count=3,
            interval=0.01,
            timeout=0.3,
            bind=world.laptop_addr("wlan0", laptop=2),
        )
    assert result.received == 0


def test_router_pages_answer_each_laptop_at_its_gateway(world: World) -> None:
    with (
        world.enter("laptop-3"),
        traffic.open_connection(
            world.gateway("usb0", 6, laptop=3), world.router_port, device="usb0", timeout=3
        ) as sock,
    ):
        sock.sendall(b"GET / HTTP/1.1\r\nHost: router\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.decode().endswith(f"\r\n\r\n{world.router_text('usb0')}\n")
    entry = world.lan_log()[-1]
    assert (entry["link"], entry["client"]) == ("usb0", world.laptop_addr("usb0", 6, 3))


def test_rate_applies_to_every_laptops_access_line(world: World) -> None:
    with world.enter("laptop-2"):
        down = traffic.download(world.target_v4, world.http_port, 3_750_000, device="wlan0")
    assert down.ok and 15 <= down.mbit_per_s <= 21, down.mbit_per_s
    world.set_rate("wlan0", 10)
    try:
        with world.enter("laptop-3"):
            down = traffic.download(world.target_v4, world.http_port, 1_875_000, device="wlan0")
            up = traffic.upload(world.target_v6, world.http_port, 1_250_000, device="wlan0")
        assert down.ok and 7.5 <= down.mbit_per_s <= 10.5, down.mbit_per_s
        assert up.ok and 7.5 <= up.mbit_per_s <= 10.5, up.mbit_per_s
    finally:
        world.set_rate("wlan0", 20)


def test_blackhole_and_loss_hit_every_laptop(world: World) -> None:
    world.blackhole("eth0")
    try:
        for laptop in (1, *EXTRA):
            assert _echo(world, laptop, "eth0", timeout=0.3).received == 0
            assert _echo(world, laptop, "eth0", 6, timeout=0.3).received == 0
            assert _echo(world, laptop, "wlan0").received == 3
    finally:
        world.restore("eth0")
    for laptop in (1, *EXTRA):
        assert _echo(world, laptop, "eth0").received == 3
    world.set_loss("eth0", 1.0)
    try:
        assert _echo(world, 3, "eth0", timeout=0.3).received == 0
    finally:
        world.set_loss("eth0", 0.0)
    assert _echo(world, 3, "eth0").received == 3


def test_link_down_and_up_on_one_laptop_only(world: World) -> None:
    def defaults() -> str:
        return world.run("laptop-2", ["ip", "route", "show", "default"]).stdout

    before = defaults()
    assert "default via 198.18.22.1 dev wlan0 metric 600" in before
    world.link_down("wlan0", laptop=2)
    try:
        assert _echo(world, 2, "wlan0", timeout=0.3).received == 0
        assert _echo(world, 1, "wlan0").received == 3
        assert _echo(world, 3, "wlan0").received == 3
        assert "wlan0" not in defaults()
    finally:
        world.link_up("wlan0", laptop=2)
    assert defaults() == before
    state = world.network_state("laptop-2")
    assert "src 198.18.22.2" in state and "src 198.18.2.2 " not in state
    assert _echo(world, 2, "wlan0", 6).received == 3


def test_summary_lists_the_laptops(world: World) -> None:
    laptops = world.summary()["laptops"]
    assert [entry["role"] for entry in laptops] == ["laptop", "laptop-2", "laptop-3"]
    assert laptops[2]["namespace"] == world.ns("laptop-3")
    assert laptops[1]["links"][0] == {
        "name": "eth0",
        "v4": "198.18.21.2",
        "v6": "2001:db8:21::2",
        "gateway_v4": "198.18.21.1",
        "gateway_v6": "2001:db8:21::1",
    }
