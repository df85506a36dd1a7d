"""System-wide mode leaves no hole: a packet capture on every link, tunnel traffic excluded.

Real braid-server and braidd in the namespace world. What is sent: ICMP and ICMPv6 echo, GRE,
SCTP and ESP from the laptop itself, and TCP, UDP, DNS and ICMP from a namespace NATed behind
the laptop (a container on Docker's default bridge, a VM, a client of a shared hotspot).
With capture off the same packets are seen on a link, so the capture does see them.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from braid.daemon.routing import headroom
from braid.netbed import LinkSpec, World
from braid.netbed.guest import GUEST4, GUEST6, Guest, nated_guest
from braid.netbed.payload import expected_sha256
from braid.netbed.stack import BraidStack, wait_for
from braid.netbed.world import python_argv

pytestmark = pytest.mark.netns

LINKS = [
    LinkSpec("eth0", "ethernet", rate_mbit=50, rtt_ms=10),
    LinkSpec("wlan0", "wifi", rate_mbit=30, rtt_ms=20),
    LinkSpec("usb0", "cellular", rate_mbit=20, rtt_ms=30),
]

#: Sends one packet of each protocol to ``argv[1]`` (IPv4) and ``argv[2]`` (IPv6) through raw
#: sockets and prints what the kernel said for each (a refused packet fails ``sendto``).
RAW_SENDER = r"""
import json, socket, struct, sys
v4, v6 = sys.argv[1], sys.argv[2]
def csum(data):
    data += b"\0" * (len(data) % 2)
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
echo = struct.pack("!BBHHH", 8, 0, 0, 0x1B, 1) + b"braid-leak"
echo = echo[:2] + struct.pack("!H", csum(echo)) + echo[4:]
cases = [
    ("icmp", socket.AF_INET, socket.IPPROTO_ICMP, v4, echo),
    ("icmp6", socket.AF_INET6, socket.IPPROTO_ICMPV6, v6,
     struct.pack("!BBHHH", 128, 0, 0, 0x1B, 1) + b"braid-leak"),
    ("gre", socket.AF_INET, 47, v4, struct.pack("!HH", 0, 0x0800) + b"braid-leak"),
    ("gre6", socket.AF_INET6, 47, v6, struct.pack("!HH", 0, 0x86DD) + b"braid-leak"),
    ("sctp", socket.AF_INET, 132, v4, struct.pack("!HHII", 5000, 5000, 0, 0) + b"\1\0\0\4"),
    ("sctp6", socket.AF_INET6, 132, v6, struct.pack("!HHII", 5000, 5000, 0, 0) + b"\1\0\0\4"),
    ("esp", socket.AF_INET, 50, v4, struct.pack("!II", 0x1B, 1) + b"braid-leak"),
]
out = {}
for name, family, proto, dst, payload in cases:
    s = socket.socket(family, socket.SOCK_RAW, proto)
    try:
        s.sendto(payload, (dst, 0))
        out[name] = "sent"
    except OSError as exc:
        out[name] = exc.strerror
    finally:
        s.close()
print(json.dumps(out))
"""
#: Protocol numbers as tcpdump names them in its one-line summaries.
SEEN_AS = {
    "icmp": "ICMP echo request",
    "icmp6": "ICMP6, echo request",
    "gre": "GREv0",
    "sctp": "sctp",
    "esp": "ESP(",
}


@pytest.fixture(scope="module")
def pristine(world: World) -> str:
    return world.network_state()


@pytest.fixture(scope="module")
def stack(world: World, pristine: str) -> Iterator[BraidStack]:
    with BraidStack(world) as braid:
        status = braid.call("up", pairing=braid.pairing_uri, mode="system")
        assert status["capture"]["in_force"] == "tunnel", status
        yield braid


def link_filter(world: World) -> str:
    """Every IP packet on a link but the tunnel's, neighbour discovery and link-local chatter."""
    return (
        f"(ip or ip6) and not host {world.server_v4} and not host {world.server_v6}"
        " and not ip6 multicast and not net fe80::/10"
        " and not (icmp6 and ip6[40] >= 133 and ip6[40] <= 137)"
    )


@contextlib.contextmanager
def every_link(world: World) -> Iterator[list]:
    """A capture on every link of the laptop for the ``with`` block; the packets afterwards."""
    packets: list = []
    with contextlib.ExitStack() as captures:
        running = [
            captures.enter_context(world.capture("laptop", spec.name, link_filter(world)))
            for spec in LINKS
        ]
        yield packets
    for capture in running:
        packets += capture.packets()


def send_raw(world: World, guest: Guest | None = None) -> dict:
    argv = [sys.executable, "-c", RAW_SENDER, world.target_v4, world.target_v6]
    if guest is None:
        done = world.run("laptop", argv, timeout=30)
    else:
        done = guest.run(argv, check=True, timeout=30)
    return json.loads(done.stdout)


def seen(packets: list, what: str) -> list:
    return [p for p in packets if SEEN_AS[what].lower() in p["line"].lower()]


def wait_capture(stack: BraidStack, in_force: str) -> None:
    assert wait_for(lambda: stack.status()["capture"]["in_force"] == in_force, 30), stack.status()


@contextlib.contextmanager
def blocking(world: World, stack: BraidStack) -> Iterator[None]:
    """The server is away and the setting is ``block``; restored afterwards."""
    assert stack.server is not None
    stack.call("set-settings", settings={"when_server_unreachable": "block"})
    stack.server.terminate()
    stack.server.wait(10)
    try:
        deadline = time.monotonic() + 20
        while stack.status()["state"] == "connected" and time.monotonic() < deadline:
            world.run(
                "laptop",
                ["curl", "-sS", "--max-time", "1", f"http://{world.target_v4}/"],
                check=False,
            )
            time.sleep(0.3)
        wait_capture(stack, "blocked")
        assert stack.status()["capture"]["active"]
        yield
    finally:
        stack.call("set-settings", settings={"when_server_unreachable": "direct"})
        if stack.server.poll() is not None:
            stack.start_server()
        wait_capture(stack, "tunnel")


def test_other_protocols_leave_in_clear_with_capture_off(world: World, stack: BraidStack) -> None:
    """The control: with Braid in proxy mode every probe packet is on a link."""
    stack.call("set-settings", settings={"mode": "proxy"})
    try:
        with every_link(world) as packets:
            sent = send_raw(world)
        assert set(sent.values()) == {"sent"}, sent
        for what in SEEN_AS:
            assert seen(packets, what), (what, packets)
    finally:
        stack.call("set-settings", settings={"mode": "system"})
    wait_capture(stack, "tunnel")


def test_other_protocols_do_not_leave_in_clear_while_connected(
    world: World, stack: BraidStack
) -> None:
    with every_link(world) as packets:
        sent = send_raw(world)
    # Refused at once: ping and friends say "not permitted" instead of waiting for an answer.
    assert set(sent.values()) == {"Operation not permitted"}, sent
    assert packets == [], packets


def test_other_protocols_do_not_leave_in_clear_while_blocked(
    world: World, stack: BraidStack
) -> None:
    with blocking(world, stack), every_link(world) as packets:
        sent = send_raw(world)
        tcp = world.run(
            "laptop",
            ["curl", "-sS", "--max-time", "3", f"http://{world.target_v4}/bytes/10?seed=blk"],
            check=False,
        )
    assert set(sent.values()) == {"Operation not permitted"}, sent
    assert tcp.returncode != 0
    assert packets == [], packets


# --- a namespace NATed behind the laptop, like a container on Docker's default bridge ---------


@pytest.fixture
def guest(world: World, stack: BraidStack) -> Iterator[Guest]:
    with nated_guest(world) as namespace:
        yield namespace


def guest_traffic(world: World, guest: Guest, seed: str) -> dict:
    """TCP (v4 and v6), UDP echo and DNS over UDP and TCP to the laptop's dead resolver."""
    out = {}
    for family, host in ((4, world.target_v4), (6, f"[{world.target_v6}]")):
        url = f"http://{host}/bytes/20000?seed={seed}{family}"
        done = guest.run(
            ["bash", "-o", "pipefail", "-c", f"curl -sS --fail --max-time 10 '{url}' | sha256sum"],
            timeout=60,
        )
        out[f"tcp{family}"] = done.stdout.split()[0] if done.returncode == 0 else None
    echo = guest.run(
        [*python_argv("braid.netbed.traffic", "echo", world.target_v4), "--count", "5",
         "--interval", "0.05"],
        timeout=60,
    )  # fmt: skip
    out["udp"] = json.loads(echo.stdout)["received"] if echo.returncode == 0 else 0
    for transport in ("udp", "tcp"):
        done = guest.run(
            [*python_argv("braid.netbed.dns", world.laptop_resolver, world.target_name, "A"),
             *(["--tcp"] if transport == "tcp" else [])],
            timeout=60,
        )  # fmt: skip
        out[f"dns-{transport}"] = world.target_v4 in done.stdout
    out["raw"] = send_raw(world, guest)
    return out


#: One HTTP answer from the guest's own address, as a container's web server gives.
GUEST_SERVER = r"""
import socket, sys
server = socket.create_server((sys.argv[1], 8080))
print("ready", flush=True)
client, _ = server.accept()
client.recv(4096)
client.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nguest")
client.close()
"""


def test_the_laptop_reaches_its_own_containers_directly(
    world: World, stack: BraidStack, guest: Guest
) -> None:
    """A container on the laptop is not on any link: system-wide mode leaves it alone."""
    server = guest.popen(
        [sys.executable, "-c", GUEST_SERVER, GUEST4], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        done = world.run(
            "laptop", ["curl", "-sS", "--max-time", "5", f"http://{GUEST4}:8080/"], check=False
        )
        assert done.stdout == "guest", done.stderr
    finally:
        server.kill()
        server.wait(5)
    raw = world.run("laptop", [sys.executable, "-c", RAW_SENDER, GUEST4, GUEST6], timeout=30)
    assert set(json.loads(raw.stdout).values()) == {"sent"}, raw.stdout


def test_a_nated_namespace_is_carried_by_the_tunnel(
    world: World, stack: BraidStack, guest: Guest
) -> None:
    dns_before = len(world.dns_log())
    with every_link(world) as packets:
        result = guest_traffic(world, guest, "guest-t")
    assert result["tcp4"] == expected_sha256(20000, "guest-t4"), result
    assert result["tcp6"] == expected_sha256(20000, "guest-t6"), result
    assert result["udp"] >= 4, result
    assert result["dns-udp"] and result["dns-tcp"], result
    # Other protocols are refused at the laptop: the guest hears "prohibited", nothing leaves.
    assert packets == [], packets
    entry = world.wait_access(lambda e: "seed=guest-t4" in e.get("path", ""))
    assert entry["client"] in (world.server_v4, world.server_v6), entry
    clients = {e["client"] for e in world.udp_log()[-5:]}
    assert clients <= {world.server_v4, world.server_v6}, clients
    queries = world.dns_log()[dns_before:]
    assert queries and all(q["client"] in (world.server_v4, world.server_v6) for q in queries)
    assert world.dead_resolver_hits() == 0


def test_a_nated_namespace_leaks_nothing_while_blocked(
    world: World, stack: BraidStack, guest: Guest
) -> None:
    with blocking(world, stack), every_link(world) as packets:
        result = guest_traffic(world, guest, "guest-b")
    assert result["tcp4"] is None and result["tcp6"] is None, result
    assert result["udp"] == 0, result
    assert not result["dns-udp"] and not result["dns-tcp"], result
    assert packets == [], packets
    assert world.dead_resolver_hits() == 0


def test_a_nated_namespace_goes_direct_with_capture_off(
    world: World, stack: BraidStack, guest: Guest
) -> None:
    """The control: without capture the guest's TCP leaves a link, masqueraded."""
    stack.call("set-settings", settings={"mode": "proxy"})
    try:
        with every_link(world) as packets:
            done = guest.run(
                ["curl", "-sS", "--max-time", "10", "-o", "/dev/null",
                 f"http://{world.target_v4}/bytes/100?seed=guest-d"],
                timeout=30,
            )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert any(p["dst"] == world.target_v4 for p in packets), packets
        entry = world.wait_access(lambda e: "seed=guest-d" in e.get("path", ""))
        assert entry["client"] == world.laptop_addr("eth0"), entry
    finally:
        stack.call("set-settings", settings={"mode": "system"})
    wait_capture(stack, "tunnel")


def test_switching_off_stopping_and_cleanup_restore_the_ruleset(
    world: World, stack: BraidStack, pristine: str
) -> None:
    # Headroom for calls keeps its own table while connected, whatever the mode; its counters
    # move with the traffic, so the mode's own changes are compared without it.
    skip = (headroom.TABLE,)
    stack.call("set-settings", settings={"mode": "proxy"})
    off = world.network_state(skip_tables=skip)
    assert "table inet braid {" not in off
    stack.call("set-settings", settings={"mode": "system"})
    wait_capture(stack, "tunnel")
    assert "table inet braid {" in world.network_state()
    stack.call("set-settings", settings={"mode": "proxy"})
    assert world.network_state(skip_tables=skip) == off
    stack.call("set-settings", settings={"mode": "system"})
    wait_capture(stack, "tunnel")
    stack.stop_daemon()
    assert world.network_state() == pristine
    stack.start_daemon()
    status = stack.call("up", pairing=stack.pairing_uri, mode="system")
    assert status["capture"]["in_force"] == "tunnel"
    assert wait_for(lambda: stack.status()["capture"]["active"], 10), stack.logs()[-3000:]
    stack.stop_daemon(signal.SIGKILL)
    assert "table inet braid {" in world.network_state()
    assert stack.cleanup_daemon().returncode == 0
    assert world.network_state() == pristine
    stack.start_daemon()
    status = stack.call("up", pairing=stack.pairing_uri, mode="system")
    assert status["capture"]["in_force"] == "tunnel"
