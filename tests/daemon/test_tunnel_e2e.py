"""The bonded tunnel end to end: real braid-server and braidd processes in the namespace world.

Links of 50, 30 and 20 Mbit/s; every transfer is checked byte for byte (SHA-256) and
the bytes each link carried are counted on the laptop's interfaces.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from braid.netbed import LinkSpec, World
from braid.netbed.stack import BraidStack, run_traffic

pytestmark = pytest.mark.netns

LINKS = [
    LinkSpec("eth0", "ethernet", rate_mbit=50, rtt_ms=10),
    LinkSpec("wlan0", "wifi", rate_mbit=30, rtt_ms=10),
    LinkSpec("usb0", "cellular", rate_mbit=20, rtt_ms=10),
]
MIB = 1 << 20


@pytest.fixture(scope="module")
def stack(world: World) -> Iterator[BraidStack]:
    with BraidStack(world) as braid:
        yield braid


@pytest.fixture(autouse=True)
def healthy_links(world: World) -> Iterator[None]:
    yield
    for link in LINKS:
        world.restore(link.name)


def traffic(world: World, *args: str, timeout: float = 120) -> dict:
    return run_traffic(world, *args, timeout=timeout)


def counters(world: World) -> dict[str, tuple[int, int]]:
    return {link.name: world.counters(link.name) for link in LINKS}


def shares(before: dict, after: dict, index: int) -> dict[str, float]:
    moved = {name: after[name][index] - before[name][index] for name in before}
    total = sum(moved.values())
    return {name: value / total for name, value in moved.items()}


def assert_fair(share: dict[str, float]) -> None:
    """Each link carried roughly its rate's share of the bytes (rates 50/30/20)."""
    total_rate = sum(link.rate_mbit for link in LINKS)
    for link in LINKS:
        fair = link.rate_mbit / total_rate
        assert 0.6 * fair <= share[link.name] <= 1.5 * fair, (link.name, share)


def test_status_lists_links_and_socks(stack: BraidStack) -> None:
    status = stack.status()
    assert status["state"] == "connected"
    assert status["server"] == f"{stack.world.server_v4}:{stack.server_port}"
    assert status["socks"] == "127.0.0.1:1080"
    assert [link["name"] for link in status["links"]] == ["eth0", "wlan0", "usb0"]
    for link in status["links"]:
        assert {"name", "kind", "priority", "state", "rx_bps", "tx_bps"} <= set(link)
        assert link["state"] == "up"


def test_cli_status_json(stack: BraidStack) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "braid.cli",
            "--control",
            str(stack.control_path),
            "status",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(done.stdout)["state"] == "connected"


def test_download_64mib_uses_every_link_fairly(world: World, stack: BraidStack) -> None:
    before = counters(world)
    result = traffic(
        world,
        "download",
        world.target_v4,
        "--bytes",
        "64M",
        "--socks",
        "127.0.0.1:1080",
        "--timeout",
        "30",
    )
    after = counters(world)
    assert result["ok"], result.get("error")
    assert result["bytes"] == 64 * MIB
    assert result["sha256"] == result["expected_sha256"]
    assert_fair(shares(before, after, 0))
    # Faster than the best link alone could ever be (50 Mbit/s).
    assert result["mbit_per_s"] > 55, result["mbit_per_s"]


def test_upload_64mib_uses_every_link_fairly(world: World, stack: BraidStack) -> None:
    before = counters(world)
    result = traffic(
        world,
        "upload",
        world.target_v4,
        "--bytes",
        "64M",
        "--socks",
        "127.0.0.1:1080",
        "--timeout",
        "30",
    )
    after = counters(world)
    assert result["ok"], result.get("error")
    assert result["remote_reported"]["bytes"] == 64 * MIB
    assert result["remote_reported"]["sha256"] == result["sha256"]
    assert_fair(shares(before, after, 1))


def test_blackholing_the_initial_subflow_link_mid_transfer_loses_nothing(
    world: World, stack: BraidStack
) -> None:
    # The initial subflow leaves from eth0, the first link in order.
    cut = threading.Timer(1.5, world.blackhole, args=("eth0",))
    cut.start()
    try:
        result = traffic(
            world,
            "download",
            world.target_v4,
            "--bytes",
            "48M",
            "--socks",
            "127.0.0.1:1080",
            "--timeout",
            "30",
        )
    finally:
        cut.cancel()
        world.restore("eth0")
    assert result["ok"], result.get("error")
    assert result["sha256"] == result["expected_sha256"]
    assert result["bytes"] == 48 * MIB


@pytest.mark.parametrize("host_attr", ["target_v6", "target_name"])
def test_ipv6_destination_and_names_resolved_at_the_server(
    world: World, stack: BraidStack, host_attr: str
) -> None:
    host = getattr(world, host_attr)
    result = traffic(world, "download", host, "--bytes", "4M", "--socks", "127.0.0.1:1080")
    assert result["ok"], result.get("error")
    assert result["sha256"] == result["expected_sha256"]


def test_the_target_sees_the_server_as_client(world: World, stack: BraidStack) -> None:
    result = traffic(
        world,
        "download",
        world.target_v4,
        "--bytes",
        "64K",
        "--seed",
        "whoami",
        "--socks",
        "127.0.0.1:1080",
    )
    assert result["ok"]
    entry = world.wait_access(lambda e: "seed=whoami" in e.get("path", ""))
    assert entry["client"] in (world.server_v4, world.server_v6), entry


def test_curl_through_the_socks_port(world: World, stack: BraidStack) -> None:
    done = world.run(
        "laptop",
        [
            "curl",
            "-sS",
            "--max-time",
            "20",
            "--socks5-hostname",
            "127.0.0.1:1080",
            f"http://{world.target_name}/bytes/1000?seed=curl",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.stdout == "200 1000", done.stderr


def test_policy_refusal_resets_the_socks_client(world: World, stack: BraidStack) -> None:
    # The SOCKS reply is pipelined (no round trip), so a refusal arrives as a reset.
    before = stack.status()["tunnel"]["flows_failed"]
    result = traffic(world, "download", "127.0.0.1", "--bytes", "1K", "--socks", "127.0.0.1:1080")
    assert not result["ok"]
    assert result["bytes"] == 0
    assert stack.status()["tunnel"]["flows_failed"] == before + 1


def _up(stack: BraidStack, uri: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "braid.cli",
            "--control",
            str(stack.control_path),
            "up",
            "--pairing",
            "-",
        ],
        input=uri + "\n",
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_wrong_token_is_refused_with_a_clear_message(stack: BraidStack) -> None:
    good = stack.pairing_uri
    assert good is not None
    bad = good.split("token=")[0] + "token=" + "A" * 43
    try:
        done = _up(stack, bad)
        assert done.returncode != 0
        assert "token" in done.stderr.lower(), done.stderr
        assert stack.status()["state"] == "disconnected"
    finally:
        stack.up(good)


def test_wrong_fingerprint_is_refused_with_a_clear_message(stack: BraidStack) -> None:
    good = stack.pairing_uri
    assert good is not None
    head, _, tail = good.partition("fp=")
    bad = head + "fp=" + "0" * 64 + tail[64:]
    try:
        done = _up(stack, bad)
        assert done.returncode != 0
        assert "fingerprint" in done.stderr.lower(), done.stderr
    finally:
        stack.up(good)


def test_malformed_pairing_is_explained(stack: BraidStack) -> None:
    done = _up(stack, "https://example.invalid/")
    assert done.returncode != 0
    assert "braid://" in done.stderr
    assert stack.status()["state"] == "connected"


def test_down_then_up(world: World, stack: BraidStack) -> None:
    assert stack.call("down")["state"] == "disconnected"
    refused = traffic(
        world, "download", world.target_v4, "--bytes", "1K", "--socks", "127.0.0.1:1080"
    )
    assert not refused["ok"]
    assert stack.call("up")["state"] in ("connected", "degraded")
    result = traffic(
        world, "download", world.target_v4, "--bytes", "1M", "--socks", "127.0.0.1:1080"
    )
    assert result["ok"]


def tunnel_sources(world: World) -> set[str]:
    """Local addresses of the laptop's MPTCP connections to the server (initial subflows)."""
    out = world.run(
        "laptop", ["ss", "-HnM", "state", "established"], capture_output=True, text=True
    )
    sources = set()
    for line in out.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[-1].endswith(":7443"):
            sources.add(fields[-2].rsplit(":", 1)[0].strip("[]"))
    return sources


def test_initial_subflow_leaves_from_the_first_link_that_is_up(
    world: World, stack: BraidStack
) -> None:
    assert tunnel_sources(world) == {world.laptop_addr("eth0")}
    world.link_down("eth0")
    try:
        deadline = time.monotonic() + 10
        while stack.status()["links"][0]["state"] == "up" and time.monotonic() < deadline:
            time.sleep(0.2)
        result = traffic(
            world, "download", world.target_v4, "--bytes", "2M", "--socks", "127.0.0.1:1080"
        )
        assert result["ok"], result.get("error")
        assert stack.status()["state"] == "degraded"
        assert world.laptop_addr("wlan0") in tunnel_sources(world)
    finally:
        world.link_up("eth0")
    deadline = time.monotonic() + 10
    while stack.status()["state"] != "connected" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stack.status()["state"] == "connected"


def test_ipv6_server_address_gives_ipv6_subflows_on_every_link(
    world: World, stack: BraidStack
) -> None:
    good = stack.pairing_uri
    assert good is not None
    v6 = good.replace(f"//{world.server_v4}:", f"//[{world.server_v6}]:")
    try:
        assert stack.up(v6)["state"] == "connected"
        before = counters(world)
        result = traffic(
            world, "download", world.target_v4, "--bytes", "24M", "--socks", "127.0.0.1:1080"
        )
        after = counters(world)
        assert result["ok"], result.get("error")
        assert_fair(shares(before, after, 0))
        assert tunnel_sources(world) == {world.laptop_addr("eth0", 6)}
    finally:
        stack.up(good)


SOCKS_UDP_CLIENT = r"""
import socket, struct, sys, json
host, port = sys.argv[1], int(sys.argv[2])
ctl = socket.create_connection(("127.0.0.1", 1080), timeout=5)
ctl.sendall(b"\x05\x01\x00")
assert ctl.recv(2) == b"\x05\x00"
ctl.sendall(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
reply = ctl.recv(262)
assert reply[1] == 0, reply
relay = (socket.inet_ntoa(reply[4:8]), struct.unpack("!H", reply[8:10])[0])
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.settimeout(3)
family = socket.AF_INET6 if ":" in host else socket.AF_INET
atyp = b"\x04" if family == socket.AF_INET6 else b"\x01"
header = b"\x00\x00\x00" + atyp + socket.inet_pton(family, host) + struct.pack("!H", port)
answers = []
for i in range(5):
    udp.sendto(header + b"ping %d" % i, relay)
    data, _ = udp.recvfrom(2048)
    answers.append(data[len(header):].decode())
print(json.dumps(answers))
"""


@pytest.mark.parametrize("host_attr", ["target_v4", "target_v6"])
def test_socks5_udp_associate_carries_datagrams(world: World, stack: BraidStack, host_attr) -> None:
    host = getattr(world, host_attr)
    done = world.run(
        "laptop",
        [sys.executable, "-c", SOCKS_UDP_CLIENT, host, "7"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [f"ping {i}" for i in range(5)]
    clients = {e["client"] for e in world.udp_log(service="echo")[-5:]}
    assert clients <= {world.server_v4, world.server_v6}, clients
