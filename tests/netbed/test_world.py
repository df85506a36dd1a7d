"""The namespace test world itself: topology, link conditions, teardown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from braid.netbed import LinkSpec, World, python_argv, sweep_stale, traffic, unavailable_reason
from braid.netbed.nsutil import NETNS_ETC_DIR, list_netns
from braid.netbed.world import child_env

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason())),
]

ONE_LINK = [LinkSpec("eth0", "ethernet", rate_mbit=None)]


def namespaces_of(prefix: str) -> list[str]:
    return [name for name in list_netns() if name.startswith(prefix)]


def _echo(
    world: World,
    link: str,
    family: int = 4,
    *,
    count: int,
    interval: float = 0.02,
    timeout: float = 1.0,
) -> traffic.EchoResult:
    target = world.target_v4 if family == 4 else world.target_v6
    with world.enter("laptop"):
        return traffic.echo(
            target, world.echo_port, count=count, interval=interval, timeout=timeout, device=link
        )


# --- life cycle ----------------------------------------------------------------------------------


def test_world_builds_and_leaves_nothing_behind() -> None:
    with World(ONE_LINK) as world:
        names = namespaces_of(world.prefix)
        assert sorted(names) == sorted(world.ns(role) for role in world.roles())
        assert (NETNS_ETC_DIR / world.ns("server") / "hosts").is_file()
        laptop_etc = NETNS_ETC_DIR / world.ns("laptop")
        assert "braid" not in (laptop_etc / "hosts").read_text()
        if Path("/etc/resolv.conf").exists():
            resolv = (laptop_etc / "resolv.conf").read_text()
            assert f"nameserver {world.laptop_resolver}\n" in resolv
            resolv = world.run("server", ["cat", "/etc/resolv.conf"]).stdout
            assert f"nameserver {world.dns_v4}\n" in resolv
        workdir = world.workdir
        assert workdir.is_dir()
    assert namespaces_of(world.prefix) == []
    assert not (NETNS_ETC_DIR / world.ns("server")).exists()
    assert not (NETNS_ETC_DIR / world.ns("laptop")).exists()
    assert not workdir.exists()
    world.close()  # idempotent


def test_world_is_removed_when_the_body_raises() -> None:
    with pytest.raises(RuntimeError, match="boom"), World(ONE_LINK) as world:
        proc = world.popen("laptop", ["sleep", "60"])
        raise RuntimeError("boom")
    assert namespaces_of(world.prefix) == []
    assert proc.poll() is not None


_OWNER = textwrap.dedent("""
    import sys, time
    from braid.netbed import LinkSpec, World
    world = World([LinkSpec("eth0", "ethernet", None)]).start()
    print(world.prefix, flush=True)
    time.sleep(60)
""")


def _start_owner() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _OWNER], stdout=subprocess.PIPE, text=True, env=child_env()
    )
    assert proc.stdout is not None
    prefix = proc.stdout.readline().strip()
    assert prefix.startswith("brd"), prefix
    assert namespaces_of(prefix)
    return proc, prefix


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_tears_down(signum: int) -> None:
    proc, prefix = _start_owner()
    proc.send_signal(signum)
    proc.wait(timeout=20)
    assert namespaces_of(prefix) == []
    assert proc.returncode != 0


def test_sweep_stale_removes_worlds_of_dead_owners() -> None:
    proc, prefix = _start_owner()
    proc.kill()
    proc.wait(timeout=5)
    assert namespaces_of(prefix)
    removed = sweep_stale()
    assert set(namespaces_of(prefix)) == set()
    assert any(name.startswith(prefix) for name in removed)
    assert not any(path.name.startswith(prefix) for path in _etc_netns())


def _etc_netns() -> Iterator[Path]:
    return NETNS_ETC_DIR.iterdir() if NETNS_ETC_DIR.is_dir() else iter(())


# --- reachability --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("link", ["eth0", "wlan0", "usb0"])
def test_laptop_downloads_through_each_link(world: World, link: str, family: int) -> None:
    target = world.target_v4 if family == 4 else world.target_v6
    source = world.laptop_addr(link, family)
    rx_before, _ = world.counters(link)
    with world.enter("laptop"):
        result = traffic.download(
            target, world.http_port, 200_000, f"{link}{family}", bind=source, device=link
        )
    assert result.ok, result
    assert result.local == source
    assert world.counters(link)[0] - rx_before >= 200_000
    entry = world.wait_access(lambda e: e["path"] == f"/bytes/200000?seed={link}{family}")
    assert entry["client"] == source and entry["bytes"] == 200_000


def test_source_address_alone_is_dropped_by_the_isp(world: World) -> None:
    """Without policy routing a packet from wlan0's address leaves by eth0 (lowest metric) and
    eth0's ISP drops it: the reverse-path filter the product has to live with."""
    with world.enter("laptop"):
        result = traffic.echo(
            world.target_v4,
            world.echo_port,
            count=3,
            interval=0.01,
            timeout=0.3,
            bind=world.laptop_addr("wlan0"),
        )
    assert result.received == 0


def test_cli_clients_in_namespaces(world: World) -> None:
    out = world.run(
        "laptop",
        python_argv(
            "braid.netbed.traffic",
            "download",
            world.target_v6,
            "--bytes",
            "2M",
            "--device",
            "eth0",
            "--progress",
            "--tick",
            "0.05",
        ),
    ).stdout
    *ticks, result = traffic.iter_json_lines(out)
    assert result["ok"] and result["bytes"] == 2 << 20
    assert ticks and all("t" in tick and "bytes" in tick for tick in ticks)
    # The server resolves the target's name through its own hosts file.
    out = world.run(
        "server", python_argv("braid.netbed.traffic", "upload", world.target_name, "--bytes", "1M")
    ).stdout
    assert json.loads(out)["ok"]
    hosts = world.run("server", ["getent", "ahosts", world.target_name]).stdout
    assert world.target_v4 in hosts and world.target_v6 in hosts


# --- link conditions -----------------------------------------------------------------------------


def test_rate_shaping_holds(world: World) -> None:
    with world.enter("laptop"):
        down = traffic.download(world.target_v4, world.http_port, 7_500_000, device="wlan0")
        up = traffic.upload(world.target_v6, world.http_port, 3_750_000, device="wlan0")
    assert down.ok and up.ok
    assert 15 <= down.mbit_per_s <= 21, down.mbit_per_s
    assert 15 <= up.mbit_per_s <= 21, up.mbit_per_s


def test_forwarder_keeps_up_unshaped(world: World) -> None:
    world.set_rate("eth0", None)
    try:
        with world.enter("laptop"):
            result = traffic.download(world.target_v4, world.http_port, 25 << 20, device="eth0")
        assert result.ok
        assert result.mbit_per_s > 100, result.mbit_per_s  # > 8k full frames/s through Python
        assert world.wire_stats("eth0")["isp>lap"]["dropped"] == 0
    finally:
        world.set_rate("eth0", 50)


def test_delay_holds_and_changes(world: World) -> None:
    result = _echo(world, "usb0", 6, count=10, interval=0.02)
    assert result.received == 10
    assert result.median_ms is not None and 38 <= result.median_ms <= 60, result.rtts_ms
    world.set_delay("usb0", 100)
    try:
        result = _echo(world, "usb0", 4, count=5, interval=0.02)
        assert result.median_ms is not None and 98 <= result.median_ms <= 125, result.rtts_ms
    finally:
        world.set_delay("usb0", 40)
    assert world.link("usb0").rtt_ms == 40


def test_blackhole_and_restore(world: World) -> None:
    world.blackhole("eth0")
    try:
        assert _echo(world, "eth0", count=5, interval=0.02, timeout=0.3).received == 0
        assert _echo(world, "eth0", 6, count=3, interval=0.02, timeout=0.3).received == 0
        assert _echo(world, "wlan0", count=3, interval=0.02).received == 3
        up = world.run("laptop", ["ip", "-br", "link", "show", "dev", "eth0"]).stdout
        assert " UP " in up
    finally:
        world.restore("eth0")
    assert _echo(world, "eth0", count=3, interval=0.02).received == 3
    assert _echo(world, "eth0", 6, count=3, interval=0.02).received == 3


def test_link_down_and_up(world: World) -> None:
    world.link_down("wlan0")
    try:
        assert _echo(world, "wlan0", count=3, interval=0.02, timeout=0.3).received == 0
        routes = world.run("laptop", ["ip", "route", "show", "default"]).stdout
        assert "wlan0" not in routes and "eth0" in routes
    finally:
        world.link_up("wlan0")
    for family in (4, 6):
        routes = world.run(
            "laptop", ["ip", f"-{family}", "route", "show", "default", "dev", "wlan0"]
        ).stdout
        assert "metric 600" in routes
        assert _echo(world, "wlan0", family, count=3, interval=0.02).received == 3


def test_loss_drops_about_that_fraction(world: World) -> None:
    world.set_loss("eth0", 0.2)
    try:
        result = _echo(world, "eth0", count=400, interval=0.003, timeout=0.5)
    finally:
        world.set_loss("eth0", 0.0)
    # 20 % each way: a round trip is lost with probability 1 - 0.8**2 = 0.36 (sd 0.024 here).
    assert 0.26 <= result.loss <= 0.46, result.loss
    assert _echo(world, "eth0", count=50, interval=0.002).loss == 0


def test_workdir_and_summary(world: World) -> None:
    summary = world.summary()
    assert [link["metric"] for link in summary["links"]] == [100, 600, 700]
    assert summary["namespaces"]["isp-2"] == world.ns("isp-wlan0") == world.ns("isp-2")
    assert world.access_log_path.parent == world.workdir
    assert os.path.isdir(world.workdir)
