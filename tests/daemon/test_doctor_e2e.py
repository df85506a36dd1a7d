"""``braid doctor`` against real braidd and braid-server in the test world: a healthy world, an
ISP that strips the MPTCP option, one that drops UDP to the server, and a strict reverse-path
filter on a laptop link. Each case undoes what it changed, also on failure."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from braid.netbed import LinkSpec, World
from braid.netbed.stack import BraidStack, start_traffic, wait_for

pytestmark = pytest.mark.netns

LINKS = [
    LinkSpec("eth0", "ethernet", rate_mbit=20, rtt_ms=10),
    LinkSpec("wlan0", "wifi", rate_mbit=20, rtt_ms=20),
    LinkSpec("usb0", "cellular", rate_mbit=10, rtt_ms=30),
]
SOCKS = "127.0.0.1:1080"


@pytest.fixture(scope="module")
def stack(world: World) -> Iterator[BraidStack]:
    with BraidStack(
        world, links=["eth0:ethernet:always", "wlan0:wifi:always", "usb0:cellular:always"]
    ) as braid:
        assert wait_for(lambda: all_alive(braid), 10), braid.status()
        yield braid


def alive(stack: BraidStack) -> dict[str, bool | None]:
    return {link["name"]: link["alive"] for link in stack.status()["links"]}


def all_alive(stack: BraidStack) -> bool:
    return all(alive(stack).values())


def doctor(stack: BraidStack, *args: str) -> subprocess.CompletedProcess:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "braid.cli", "--control", str(stack.control_path), "doctor", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    elapsed = time.monotonic() - started
    assert elapsed < 8, f"braid doctor took {elapsed:.1f} s"
    print(done.stdout, done.stderr)
    return done


def report(stack: BraidStack) -> dict:
    done = doctor(stack, "--json")
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)


def findings(result: dict, link: str) -> dict[str, dict]:
    entry = next(item for item in result["links"] if item["name"] == link)
    return {finding["check"]: finding for finding in entry["findings"]}


def test_a_healthy_world_is_healthy(stack: BraidStack) -> None:
    done = doctor(stack)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "nothing wrong found" in done.stdout or "warnings above" in done.stdout
    result = report(stack)
    for name in ("eth0", "wlan0", "usb0"):
        found = findings(result, name)
        for check in ("tcp", "mptcp", "udp", "rtt", "rp_filter"):
            assert found[check]["level"] == "ok", (name, found)
    # the first link carries the test connection; the others join it
    assert "join" not in findings(result, "eth0")
    for name in ("wlan0", "usb0"):
        assert findings(result, name)["join"]["level"] == "ok", findings(result, name)
    limits = next(f for f in result["laptop"] if f["check"] == "limits")
    assert limits["level"] == "ok" and "subflows 8" in limits["text"]
    # The server's limits, as braid-server reports them (it raised them to 8 at its start).
    (server,) = result["server_checks"]
    assert server["level"] == "ok" and "subflows 8" in server["text"], server
    assert "the server:" in done.stdout


def test_doctors_asked_together_share_one_run(stack: BraidStack) -> None:
    argv = [sys.executable, "-m", "braid.cli", "--control", str(stack.control_path), "doctor"]
    procs = [
        subprocess.Popen([*argv, "--json"], stdout=subprocess.PIPE, text=True) for _ in range(3)
    ]
    outs = [json.loads(proc.communicate(timeout=30)[0]) for proc in procs]
    # one run answered them all: the very same observations
    assert len({json.dumps(out["observations"], sort_keys=True) for out in outs}) == 1


def test_an_isp_that_strips_mptcp_is_named(world: World, stack: BraidStack) -> None:
    world.strip_mptcp("wlan0")
    proc = None
    try:
        # A download spreads over every link; wlan0's joins lose their option on the way.
        proc = start_traffic(
            world,
            "download",
            world.target_v4,
            "--bytes",
            "40M",
            "--socks",
            SOCKS,
            "--timeout",
            "60",
        )
        assert wait_for(lambda: stack.status()["tunnel"]["paths"]["spread"] >= 1, 15)
        time.sleep(1.0)  # the joins have had their round trips
        result = report(stack)
        wlan0 = findings(result, "wlan0")
        assert wlan0["tcp"]["level"] == "ok", wlan0
        assert wlan0["mptcp"]["level"] == "error", wlan0
        assert "strips the MPTCP option" in wlan0["mptcp"]["text"]
        assert wlan0["join"]["level"] == "error", wlan0
        assert wlan0["subflows"]["level"] == "error", wlan0
        for name in ("eth0", "usb0"):
            found = findings(result, name)
            assert found["mptcp"]["level"] == "ok", (name, found)
            assert found["subflows"]["level"] == "ok", (name, found)
        assert doctor(stack).returncode == 1
    finally:
        world.restore("wlan0")
        if proc is not None:
            proc.kill()
            proc.communicate(timeout=30)


def test_an_isp_that_drops_udp_is_named(world: World, stack: BraidStack) -> None:
    world.drop_udp("usb0")
    try:
        assert wait_for(lambda: alive(stack)["usb0"] is False, 5)
        result = report(stack)
        usb0 = findings(result, "usb0")
        assert usb0["tcp"]["level"] == "ok", usb0
        assert usb0["udp"]["level"] == "error", usb0
        assert (
            "UDP to the server's port" in usb0["udp"]["text"] and "blocked" in usb0["udp"]["text"]
        )
        assert findings(result, "eth0")["udp"]["level"] == "ok"
        doctor(stack)
    finally:
        world.restore("usb0")
    assert wait_for(lambda: all_alive(stack), 10)


def test_a_blackholed_link_is_named_in_bounded_time(world: World, stack: BraidStack) -> None:
    world.blackhole("usb0")
    try:
        assert wait_for(lambda: alive(stack)["usb0"] is False, 5)
        started = time.monotonic()
        result = report(stack)  # report() also bounds the whole command
        assert time.monotonic() - started < 8
        usb0 = findings(result, "usb0")
        assert usb0["tcp"]["level"] == "error" and "no answer" in usb0["tcp"]["text"], usb0
        assert usb0["udp"]["level"] == "error", usb0
        assert findings(result, "wlan0")["join"]["level"] == "ok"
    finally:
        world.restore("usb0")
    assert wait_for(lambda: all_alive(stack), 10)


def test_a_strict_reverse_path_filter_is_a_warning(world: World, stack: BraidStack) -> None:
    key = "net.ipv4.conf.wlan0.rp_filter"
    world.run("laptop", ["sysctl", "-qw", f"{key}=1"], check=True)
    try:
        result = report(stack)
        wlan0 = findings(result, "wlan0")
        assert wlan0["rp_filter"]["level"] == "warning", wlan0
        assert "rp_filter=2" in wlan0["rp_filter"]["text"]
        # Braid's rule for wlan0's address gives the way back: its subflows and probes work
        assert wlan0["join"]["level"] == "ok" and wlan0["udp"]["level"] == "ok", wlan0
        assert findings(result, "eth0")["rp_filter"]["level"] == "ok"
        doctor(stack)
    finally:
        world.run("laptop", ["sysctl", "-qw", f"{key}=0"], check=False)


def test_disconnected_braidd_still_checks_the_paths(stack: BraidStack) -> None:
    stack.call("down")
    try:
        result = report(stack)
        assert result["laptop"][0]["check"] == "server"
        assert "not connected" in result["laptop"][0]["text"]
        for name in ("eth0", "wlan0", "usb0"):
            found = findings(result, name)
            assert found["tcp"]["level"] == "ok" and found["mptcp"]["level"] == "ok", found
            assert found["udp"]["level"] == "warning", found  # no probes while disconnected
    finally:
        stack.up()


def test_doctor_says_when_braidd_is_not_running(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "braid.cli", "--control", str(tmp_path / "none.sock"), "doctor"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 3
    assert "not running" in done.stderr
