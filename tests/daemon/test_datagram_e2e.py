"""The datagram path end to end: real braid-server and braidd in the namespace world.

An unmodified application's UDP (system-wide mode) goes as sealed datagrams over the links'
own UDP to the server, real-time flows on two links at once; where an ISP drops UDP, the
flow falls back to the tunnel by itself.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from braid.daemon.routing import headroom
from braid.daemon.routing.capture import OWN_MARK
from braid.netbed import LinkSpec, World
from braid.netbed.stack import BraidStack, run_traffic, start_traffic, wait_for
from braid.protocol import probe
from braid.protocol.pairing import parse_pairing

pytestmark = pytest.mark.netns

PROBE_UDP_LENGTH = 8 + probe.SIZE  # a health probe's UDP length; the datagram path's are larger
LINKS = [
    LinkSpec("eth0", "ethernet", rate_mbit=50, rtt_ms=10),
    LinkSpec("wlan0", "wifi", rate_mbit=30, rtt_ms=20),
    LinkSpec("usb0", "cellular", rate_mbit=20, rtt_ms=30),
]


@pytest.fixture(scope="module")
def stack(world: World) -> Iterator[BraidStack]:
    with BraidStack(world) as braid:
        status = braid.call("up", pairing=braid.pairing_uri, mode="system")
        assert status["capture"]["in_force"] == "tunnel", status
        wait_for(lambda: braid.status()["datagram"]["session"], 15)
        wait_for(
            lambda: sum(link["usable"] for link in braid.status()["datagram"]["links"]) == 3, 15
        )
        yield braid


def flows_to(stack: BraidStack, target: str) -> list[dict]:
    return [f for f in stack.status()["datagram"]["flows"] if f["destination"].startswith(target)]


@pytest.mark.parametrize("family", [4, 6])
def test_a_call_goes_as_datagrams_on_two_links_and_arrives_once(
    world: World, stack: BraidStack, family: int
) -> None:
    target = world.target_v4 if family == 4 else world.target_v6
    before = len(world.udp_log())
    sent = stack.status()["datagram"]["sent"]
    result = run_traffic(
        world, "echo", target, "--count", "100", "--interval", "0.02", "--size", "160"
    )
    assert result["received"] == 100, result
    # Each datagram reached the destination once, although most went on two links.
    arrived = world.udp_log()[before:]
    assert len(arrived) == 100, len(arrived)
    status = stack.status()["datagram"]
    assert status["copies"] > 50 and status["sent"] - sent > 150, status
    flow = flows_to(stack, target if family == 4 else f"[{target}]")[-1]
    assert flow["path"] == "datagram" and flow["class"] == "realtime", flow
    assert flow["mode"] == "redundant" and len(flow["links"]) == 2, flow
    assert flow["datagrams_down"] == 100, flow


def test_a_datagram_too_large_for_the_links_goes_by_the_tunnel_unfragmented(
    world: World, stack: BraidStack
) -> None:
    # 1450 bytes fit the application's path (MTU 1500) but not sealed (64 bytes more) on a
    # link: they must not leave fragmented, nor be lost.
    too_large = stack.status()["datagram"]["too_large"]
    small = run_traffic(world, "echo", world.target_v4, "--count", "5", "--size", "200")
    assert small["received"] == 5, small
    with world.capture("laptop", "any", "ip[6:2] & 0x3fff != 0") as capture:
        result = run_traffic(world, "echo", world.target_v4, "--count", "5", "--size", "1450")
        time.sleep(0.3)
        through_braid = capture.count()
        # The capture does see fragments: 3000 bytes sent past Braid (with its mark) on eth0.
        world.run(
            "laptop", [sys.executable, "-c", FRAGMENTED, world.laptop_addr("eth0"), world.target_v4]
        )
        time.sleep(0.3)
    assert result["received"] == 5, result
    assert through_braid == 0  # no fragment on any interface
    assert capture.count() > 0
    flow = flows_to(stack, world.target_v4)[-1]
    assert flow["via_tunnel"] == 5 and flow["datagrams_down"] == 5, flow
    assert stack.status()["datagram"]["too_large"] - too_large == 5


def test_a_link_whose_isp_drops_udp_is_left_out_and_blocked_everywhere_means_the_tunnel(
    world: World, stack: BraidStack
) -> None:
    try:
        world.drop_udp("eth0")
        wait_for(lambda: not usable(stack)["eth0"], 5)
        result = run_traffic(world, "echo", world.target_v4, "--count", "50", "--interval", "0.02")
        assert result["received"] == 50, result
        flow = flows_to(stack, world.target_v4)[-1]
        assert flow["path"] == "datagram" and "eth0" not in flow["links"], flow
        # Every link now drops the datagram path's UDP. The health probes (50 bytes with their
        # header) still pass: a link whose probes fail is dead for TCP as well, which is not
        # what this checks.
        for name in ("eth0", "wlan0", "usb0"):
            world.drop_udp(name, larger_than=PROBE_UDP_LENGTH)
        wait_for(lambda: not any(usable(stack).values()), 5)
        assert all(link["alive"] for link in stack.status()["links"])
        # A new flow now goes as frames in the session's tunnel connection.
        result = run_traffic(
            world, "echo", world.target_v4, "--count", "50", "--interval", "0.02", "--timeout", "3"
        )
        assert result["received"] == 50, result
        flow = flows_to(stack, world.target_v4)[-1]
        assert flow["path"] == "tunnel" and flow["links"] == [], flow
        assert flow["via_tunnel"] == 50 and flow["datagrams_down"] == 50, flow
        assert "UDP FLOW" in render(stack) and "tunnel" in render(stack)
    finally:
        for name in ("eth0", "wlan0", "usb0"):
            world.restore(name)
    wait_for(lambda: all(usable(stack).values()), 10)


def test_redundancy_rides_through_a_blackholed_link(world: World, stack: BraidStack) -> None:
    proc = start_traffic(
        world, "echo", world.target_v4, "--count", "250", "--interval", "0.02", "--size", "160"
    )
    carrying = None
    try:
        time.sleep(1.5)  # classified real-time, on the two best links
        carrying = flows_to(stack, world.target_v4)[-1]["links"][0]
        world.blackhole(carrying)
        out, _ = proc.communicate(timeout=30)
    finally:
        if carrying is not None:
            world.restore(carrying)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["received"] == 250, result
    assert max(result["rtts_ms"]) < 100, result


def usable(stack: BraidStack) -> dict[str, bool]:
    return {link["name"]: link["usable"] for link in stack.status()["datagram"]["links"]}


def render(stack: BraidStack) -> str:
    from braid.cli import render_status

    return render_status(stack.status())


FRAGMENTED = f"""
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, {OWN_MARK})
sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
sock.bind((sys.argv[1], 0))
sock.sendto(bytes(3000), (sys.argv[2], 9))
"""

MARKED_CALL = """
import socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 46 << 2)  # DSCP EF, as call apps mark voice
sock.settimeout(2)
got = 0
for i in range(3):
    sock.sendto(b"ef %d" % i, (sys.argv[1], 7))
    got += sock.recv(100) == b"ef %d" % i
    time.sleep(0.2)
print(got)
"""


def test_a_flow_marked_ef_is_real_time_from_its_first_datagram(
    world: World, stack: BraidStack
) -> None:
    done = world.run(
        "laptop",
        [sys.executable, "-c", MARKED_CALL, world.target_v4],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.stdout.strip() == "3", done
    flow = flows_to(stack, world.target_v4)[-1]
    # Three datagrams in 0.6 s are no call by their shape: the mark alone made it real-time.
    assert flow["class"] == "realtime" and flow["mode"] == "redundant", flow
    assert len(flow["links"]) == 2, flow


def test_the_datagram_path_over_ipv6_links(world: World, stack: BraidStack) -> None:
    """Paired with the server's IPv6 address: the links' own IPv6 addresses carry the call."""
    v4 = parse_pairing(stack.pairing_uri)
    try:
        stack.call("up", pairing=replace(v4, host=world.server_v6).uri(), mode="system")
        wait_for(lambda: stack.status()["datagram"]["session"], 15)
        wait_for(lambda: sum(usable(stack).values()) == 3, 15)
        result = run_traffic(
            world, "echo", world.target_v6, "--count", "100", "--interval", "0.02", "--size", "160"
        )
        assert result["received"] == 100, result
        flow = flows_to(stack, f"[{world.target_v6}]")[-1]
        assert flow["path"] == "datagram" and len(flow["links"]) == 2, flow
    finally:
        stack.call("up", pairing=stack.pairing_uri, mode="system")


def headroom_rules(world: World) -> str:
    done = world.run(
        "laptop", ["nft", "list", "table", "inet", headroom.TABLE], capture_output=True, text=True
    )
    return done.stdout if done.returncode == 0 else ""


def test_a_calls_link_is_held_under_its_rate_while_a_download_queues_there(
    world: World, stack: BraidStack
) -> None:
    """Headroom for calls: a download fills eth0 (slowed to 8 Mbit/s, still the link of lowest
    delay) and queues at its provider; a call on eth0 then holds the tunnels' downloads on eth0
    20 % under the rate the link carried, the server's TCP over it is dropped, and the hold goes
    with the call."""
    world.set_rate("eth0", 8)
    # The other links slower than eth0 even with its queue, so the call keeps to eth0.
    world.set_delay("wlan0", 80)
    world.set_delay("usb0", 100)
    download = start_traffic(
        world, "download", world.target_v4, "--bytes", str(1 << 30), "--timeout", "60"
    )
    call = None
    try:
        # Every link shows its rate, and eth0 its queue, long enough for eth0's rate (50 Mbit/s
        # earlier in this module) to come down to what it carries now.
        time.sleep(8.0)
        call = start_traffic(
            world, "echo", world.target_v4, "--count", "400", "--interval", "0.02", "--size", "160"
        )
        wait_for(lambda: "eth0" in stack.status()["datagram"]["held"], 10)
        held = stack.status()["datagram"]["held"]
        assert 1e6 < held["eth0"] < 0.85 * 8e6, held
        assert f'iifname "eth0" jump link_{b"eth0".hex()}' in headroom_rules(world)
        # The sender goes over the hold and is dropped: its queue at eth0's provider drains.
        wait_for(lambda: re.search(r"counter packets [1-9]", headroom_rules(world)), 15)
        out, _ = call.communicate(timeout=30)
        assert json.loads(out.strip().splitlines()[-1])["received"] >= 396
        wait_for(lambda: not stack.status()["datagram"]["held"], 10)
        rules = headroom_rules(world)  # the limits count on, dropping nothing
        assert "limit rate over" in rules and "elements" not in rules
    finally:
        for proc in (call, download):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        world.set_rate("eth0", LINKS[0].rate_mbit)
        for link in LINKS[1:]:
            world.set_delay(link.name, link.rtt_ms)
