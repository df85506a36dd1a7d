"""System-wide mode end to end: unmodified clients, no proxy settings, everything through Braid.

Real braid-server and braidd in the namespace world; the laptop's configured resolver is not
reachable directly, so names resolve only through the tunnel.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from braid.netbed import LinkSpec, World, nsutil
from braid.netbed.dns import DnsServer, braid_zone
from braid.netbed.payload import expected_sha256
from braid.netbed.stack import BraidStack, run_traffic, wait_for
from braid.protocol.pairing import parse_pairing

pytestmark = pytest.mark.netns

LINKS = [
    LinkSpec("eth0", "ethernet", rate_mbit=50, rtt_ms=10),
    LinkSpec("wlan0", "wifi", rate_mbit=30, rtt_ms=20),
    LinkSpec("usb0", "cellular", rate_mbit=20, rtt_ms=30),
]


@pytest.fixture(scope="module")
def pristine(world: World) -> str:
    return world.network_state()


@pytest.fixture(scope="module")
def stack(world: World, pristine: str) -> Iterator[BraidStack]:
    with BraidStack(world) as braid:
        status = braid.call("up", pairing=braid.pairing_uri, mode="system")
        assert status["capture"]["in_force"] == "tunnel", status
        yield braid


def laptop(world: World, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    done = world.run(
        "laptop", list(argv), capture_output=True, text=False, check=False, timeout=timeout
    )
    done.stdout = done.stdout.decode(errors="replace")
    done.stderr = done.stderr.decode(errors="replace")
    return done


def curl_sha(world: World, url: str) -> str:
    done = world.run(
        "laptop",
        ["sh", "-c", f"curl -sS --fail --max-time 60 '{url}' | sha256sum"],
        capture_output=True,
        text=True,
        check=False,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[0]


@pytest.mark.parametrize("host", ["target_v4", "target_v6", "target_name"])
def test_unmodified_curl_goes_through_the_tunnel(world: World, stack: BraidStack, host) -> None:
    name = getattr(world, host)
    url_host = f"[{name}]" if ":" in name else name
    seed = f"sys-{host}"
    n = 4 << 20
    assert curl_sha(world, f"http://{url_host}/bytes/{n}?seed={seed}") == expected_sha256(n, seed)
    entry = world.wait_access(lambda e: f"seed={seed}" in e.get("path", ""))
    assert entry["client"] in (world.server_v4, world.server_v6), entry


def test_a_captured_download_uses_more_than_one_link(world: World, stack: BraidStack) -> None:
    before = {spec.name: world.counters(spec.name)[0] for spec in LINKS}
    n = 24 << 20
    assert curl_sha(world, f"http://{world.target_v4}/bytes/{n}?seed=spread") == expected_sha256(
        n, "spread"
    )
    moved = {name: world.counters(name)[0] - before[name] for name in before}
    assert sum(1 for v in moved.values() if v > 2_000_000) >= 2, moved


@pytest.mark.parametrize("family", [4, 6])
def test_udp_echo_through_the_tunnel(world: World, stack: BraidStack, family) -> None:
    target = world.target_v4 if family == 4 else world.target_v6
    result = run_traffic(world, "echo", target, "--count", "10", "--interval", "0.05")
    assert result["received"] >= 9, result
    clients = {e["client"] for e in world.udp_log()}
    assert world.server_v4 in clients or world.server_v6 in clients, clients
    assert world.laptop_addr("eth0") not in clients


def test_names_resolve_through_the_tunnel_and_no_dns_leaves_in_clear(
    world: World, stack: BraidStack
) -> None:
    # The laptop's own resolver is unreachable: only the tunnel can answer.
    with world.capture("laptop", "any", "port 53") as capture:
        done = laptop(world, "getent", "ahosts", world.target_name)
        aaaa = laptop(world, "getent", "ahostsv6", "v6only.braid.test")
        tcp = laptop(
            world,
            sys.executable,
            "-m",
            "braid.netbed.dns",
            "--tcp",
            "198.18.1.53",
            world.target_name,
            "A",
        )
        time.sleep(0.3)
    assert world.target_v4 in done.stdout and world.target_v6 in done.stdout, done
    assert "2001:db8:ff::1" in aaaa.stdout, aaaa
    assert tcp.returncode == 0 and world.target_v4 in tcp.stdout, tcp
    packets = capture.packets()
    # The capture works: it saw the queries loop back to braidd through lo...
    assert any(p.get("iface", "").startswith("lo") for p in packets), packets
    # ...and none on any link.
    leaked = [p for p in packets if not p.get("iface", "").startswith("lo")]
    assert leaked == [], leaked
    assert world.dead_resolver_hits() == 0
    queries = world.dns_log()
    assert queries and all(q["client"] in (world.server_v4, world.server_v6) for q in queries)


def test_a_lan_address_is_reached_directly(world: World, stack: BraidStack) -> None:
    done = laptop(world, "curl", "-sS", "--max-time", "5", "http://198.18.1.1/")
    assert "router 1" in done.stdout, done
    entry = world.lan_log()[-1]
    assert entry["client"] == world.laptop_addr("eth0")


def test_quic_is_refused_and_tcp_443_works(world: World, stack: BraidStack) -> None:
    before = len(world.udp_log(service="quic"))
    quic = run_traffic(world, "echo", world.target_v4, "--port", "443", "--count", "3")
    assert quic["received"] == 0, quic
    assert len(world.udp_log(service="quic")) == before
    done = laptop(
        world,
        "curl",
        "-sS",
        "--max-time",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        f"http://{world.target_v4}:443/bytes/1000?seed=q",
    )
    assert done.returncode == 0 and done.stdout == "1000", done.stderr


def test_quic_is_carried_when_the_preference_is_off(world: World, stack: BraidStack) -> None:
    stack.call("set-settings", settings={"prefer_tcp_for_web": False})
    try:
        run_traffic(world, "echo", world.target_v4, "--port", "443", "--count", "3")
        carried = world.udp_log(service="quic")
        assert carried and carried[-1]["client"] in (world.server_v4, world.server_v6), carried
    finally:
        stack.call("set-settings", settings={"prefer_tcp_for_web": True})


def test_server_unreachable_falls_back_direct_or_blocks(world: World, stack: BraidStack) -> None:
    assert stack.server is not None
    stack.server.terminate()
    stack.server.wait(10)
    try:
        # Pooled connections die with the server; the daemon notices and goes direct.
        laptop(world, "curl", "-sS", "--max-time", "3", f"http://{world.target_v4}/bytes/10")
        deadline = time.monotonic() + 20
        while stack.status()["capture"]["active"] and time.monotonic() < deadline:
            laptop(world, "curl", "-sS", "--max-time", "2", f"http://{world.target_v4}/bytes/10")
            time.sleep(0.3)
        assert stack.status()["capture"]["in_force"] == "direct"
        assert not stack.status()["capture"]["active"]
        direct = laptop(
            world, "curl", "-sS", "--max-time", "5", f"http://{world.target_v4}/bytes/10?seed=d"
        )
        assert direct.returncode == 0
        entry = world.wait_access(lambda e: "seed=d" in e.get("path", ""))
        assert entry["client"] == world.laptop_addr("eth0")

        stack.call("set-settings", settings={"when_server_unreachable": "block"})
        assert stack.status()["capture"]["in_force"] == "blocked"
        assert stack.status()["capture"]["active"]
        blocked = laptop(
            world, "curl", "-sS", "--max-time", "3", f"http://{world.target_v4}/bytes/10?seed=b"
        )
        assert blocked.returncode != 0
    finally:
        stack.call("set-settings", settings={"when_server_unreachable": "direct"})
        stack.start_server()
    deadline = time.monotonic() + 30
    while stack.status()["capture"]["in_force"] != "tunnel" and time.monotonic() < deadline:
        time.sleep(0.3)
    assert stack.status()["capture"]["in_force"] == "tunnel"


def test_a_firewall_reload_does_not_turn_capture_off(world: World, stack: BraidStack) -> None:
    """nftables.service's reload, like many firewalls, begins with ``flush ruleset``: braidd
    puts its tables back within seconds, and unmodified programs are carried again."""
    laptop(world, "nft", "flush", "ruleset")
    assert laptop(world, "nft", "list", "table", "inet", "braid").returncode != 0
    assert wait_for(
        lambda: laptop(world, "nft", "list", "table", "inet", "braid").returncode == 0, 15
    ), "braidd did not put its capture table back"
    seed, n = "after-reload", 1 << 20
    assert curl_sha(world, f"http://{world.target_v4}/bytes/{n}?seed={seed}") == expected_sha256(
        n, seed
    )
    entry = world.wait_access(lambda e: f"seed={seed}" in e.get("path", ""))
    assert entry["client"] in (world.server_v4, world.server_v6), entry


def test_switching_off_and_crash_cleanup_restore_nft_and_rules(
    world: World, stack: BraidStack, pristine: str
) -> None:
    stack.call("set-settings", settings={"mode": "proxy"})
    without_capture = world.network_state()
    assert "table inet braid {" not in without_capture
    stack.call("set-settings", settings={"mode": "system"})
    assert "table inet braid {" in world.network_state()
    stack.stop_daemon(signal.SIGKILL)
    assert "table inet braid {" in world.network_state()
    assert stack.cleanup_daemon().returncode == 0
    assert world.network_state() == pristine
    stack.start_daemon()
    status = stack.call("up", pairing=stack.pairing_uri, mode="system")
    assert status["capture"]["in_force"] == "tunnel"


@contextlib.contextmanager
def resolver_knowing(world: World, name: str) -> Iterator[str]:
    """A resolver that also knows the server's ``name``, used by the laptop and the server.

    The laptop's lookups are captured in system-wide mode (DNS always is) and answered through
    the tunnel by the server's resolver, so both use this one while the test runs.
    """
    address = "198.19.0.54"
    world.run("inet", ["ip", "address", "add", f"{address}/32", "dev", "lo"])
    zone = braid_zone(world.target_v4, world.target_v6)
    records = {**zone.records, name: {"A": [world.server_v4], "AAAA": [world.server_v6]}}
    with nsutil.entered(world.ns("inet")):
        server = DnsServer([address], zone=replace(zone, records=records)).start()
    confs = [nsutil.NETNS_ETC_DIR / world.ns(role) / "resolv.conf" for role in ("laptop", "server")]
    before = [conf.read_text() for conf in confs]
    try:
        for conf in confs:  # in place: the files are bind-mounted into running processes
            conf.write_text(f"nameserver {address}\noptions timeout:1 attempts:1\n")
        yield address
    finally:
        for conf, text in zip(confs, before, strict=True):
            conf.write_text(text)
        server.close()
        world.run("inet", ["ip", "address", "del", f"{address}/32", "dev", "lo"], check=False)


def test_a_server_name_survives_a_server_restart_in_blocking_system_mode(
    world: World, stack: BraidStack
) -> None:
    """Before: every new tunnel looked the server's name up; braidd's own lookup was captured
    and needed a tunnel, so after a server restart no tunnel ever opened, the failure skipped
    the pool's bookkeeping, and the status said connected while everything was black-holed."""
    assert stack.server is not None and stack.pairing_uri is not None
    name = "vps.braid.test"
    by_address = parse_pairing(stack.pairing_uri)
    by_name = replace(by_address, host=name).uri()
    with resolver_knowing(world, name):
        stack.call("set-settings", settings={"when_server_unreachable": "block"})
        try:
            status = stack.call("up", pairing=by_name, mode="system")
            assert status["capture"]["in_force"] == "tunnel", status
            assert curl_sha(world, f"http://{world.target_v4}/bytes/1000?seed=1") == (
                expected_sha256(1000, "1")
            )
            stack.server.terminate()
            stack.server.wait(10)
            stopped = time.monotonic()
            deadline = time.monotonic() + 10
            while stack.status()["state"] == "connected" and time.monotonic() < deadline:
                laptop(world, "curl", "-sS", "--max-time", "1", f"http://{world.target_v4}/")
                time.sleep(0.3)
            status = stack.status()
            assert status["state"] == "connecting", status  # not "connected" while it is not
            assert status["capture"]["in_force"] == "blocked"
            time.sleep(max(0.0, 5 - (time.monotonic() - stopped)))  # a 5 s gap in all
            stack.start_server()
            assert wait_for(lambda: stack.status()["capture"]["in_force"] == "tunnel", 30), (
                stack.status()
            )
            assert curl_sha(world, f"http://{world.target_v4}/bytes/1000?seed=2") == (
                expected_sha256(1000, "2")
            )
        finally:
            stack.call("set-settings", settings={"when_server_unreachable": "direct"})
            if stack.server.poll() is not None:
                stack.start_server()
            stack.call("up", pairing=stack.pairing_uri, mode="system")
