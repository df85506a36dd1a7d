"""braidd judges and steers its links: priorities, order, caps, links coming and going,
health probes and failover, and who may change what. Real processes in the namespace world."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from braid.netbed import LinkSpec, World
from braid.netbed.stack import BraidStack, run_traffic, start_traffic, wait_for

pytestmark = pytest.mark.netns

LINKS = [
    LinkSpec("eth0", "ethernet", rate_mbit=40, rtt_ms=10),
    LinkSpec("wlan0", "wifi", rate_mbit=30, rtt_ms=20),
    LinkSpec("usb0", "cellular", rate_mbit=20, rtt_ms=30),
]
SOCKS = "127.0.0.1:1080"


@pytest.fixture(scope="module")
def stack(world: World, tmp_path_factory) -> Iterator[BraidStack]:
    braid = BraidStack(world)
    # A control socket any user can reach (pytest's own temp dirs are root-only).
    public = Path(tempfile.mkdtemp(prefix="braid-control-"))
    public.chmod(0o755)
    braid.control_path = public / "control.sock"
    try:
        with braid:
            yield braid
    finally:
        shutil.rmtree(public, ignore_errors=True)


@pytest.fixture(autouse=True)
def reset(world: World, stack: BraidStack) -> Iterator[None]:
    yield
    for link in LINKS:
        world.restore(link.name)
        stack.call("set-link", link=link.name, priority="always", cap=None)
    wait_for(lambda: all(link["alive"] is not False for link in stack.call("links")), 5)


def link(stack: BraidStack, name: str) -> dict:
    return next(item for item in stack.call("links") if item["name"] == name)


def traffic(world: World, *args: str, timeout: float = 120) -> dict:
    return run_traffic(world, *args, timeout=timeout)


def download(world: World, size: str) -> dict:
    return traffic(
        world, "download", world.target_v4, "--bytes", size, "--socks", SOCKS, "--timeout", "30"
    )


def rx_bytes(world: World) -> dict[str, int]:
    return {spec.name: world.counters(spec.name)[0] for spec in LINKS}


def moved(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before[name] for name in before}


def background_download(world: World, size: str) -> subprocess.Popen:
    return start_traffic(
        world,
        "download",
        world.target_v4,
        "--bytes",
        size,
        "--socks",
        SOCKS,
        "--timeout",
        "30",
    )


def finish(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=120)
    return json.loads(out.strip().splitlines()[-1])


# -- health and failover ------------------------------------------------------


def test_every_link_is_probed(stack: BraidStack) -> None:
    links = wait_for(lambda: [x for x in stack.call("links") if x["rtt_ms"] is not None], 5)
    assert {x["name"] for x in links} == {"eth0", "wlan0", "usb0"}
    by_name = {x["name"]: x for x in links}
    assert all(x["alive"] is True for x in links)
    assert 25 <= by_name["usb0"]["rtt_ms"] <= 80, by_name["usb0"]
    assert by_name["eth0"]["rtt_ms"] < by_name["usb0"]["rtt_ms"]

    # The warm pool's connections wait on the first link alone: a flow spreads only once busy.
    def pooled_on_eth0_only() -> bool:
        subflows = {x["name"]: x["subflows"] for x in stack.call("links")}
        return subflows["eth0"] >= 2 and subflows["wlan0"] == subflows["usb0"] == 0

    assert wait_for(pooled_on_eth0_only, 5), stack.call("links")


def test_blackholed_link_is_out_within_1s_and_back_within_3s(
    world: World, stack: BraidStack
) -> None:
    cut = time.monotonic()
    world.blackhole("wlan0")
    out = wait_for(lambda: not link(stack, "wlan0")["carrying"], 3, 0.02)
    out_after = time.monotonic() - cut
    assert out, "wlan0 was not taken out"
    assert out_after < 1.0, f"took {out_after:.2f} s"
    assert "wlan0" not in world.run("laptop", ["ip", "mptcp", "endpoint"]).stdout
    assert stack.status()["state"] == "degraded"

    back = time.monotonic()
    world.restore("wlan0")
    assert wait_for(lambda: link(stack, "wlan0")["carrying"], 5, 0.02)
    back_after = time.monotonic() - back
    assert back_after < 3.0, f"took {back_after:.2f} s"
    assert "wlan0" in world.run("laptop", ["ip", "mptcp", "endpoint"]).stdout
    events = [e["event"] for e in stack.status()["events"] if e.get("link") == "wlan0"]
    assert "link-lost" in events and "link-back" in events


def test_new_connections_work_while_the_first_link_is_blackholed(
    world: World, stack: BraidStack
) -> None:
    world.blackhole("eth0")
    assert wait_for(lambda: stack.status()["best_link"] == "wlan0", 2)
    for _ in range(5):
        result = download(world, "256K")
        assert result["ok"], result.get("error")
        assert result["ttfb"] < 1.0


def test_transfer_survives_blackhole_and_return_of_the_busiest_link(
    world: World, stack: BraidStack
) -> None:
    proc = background_download(world, "40M")
    time.sleep(1.5)
    world.blackhole("eth0")
    time.sleep(1.5)
    world.restore("eth0")
    result = finish(proc)
    assert result["ok"], result.get("error")
    assert result["sha256"] == result["expected_sha256"]


# -- links coming and going ---------------------------------------------------


def test_a_link_that_appears_carries_bytes_within_2s(world: World, stack: BraidStack) -> None:
    world.link_down("usb0")
    assert wait_for(lambda: link(stack, "usb0")["state"] == "down", 3)
    proc = background_download(world, "48M")
    try:
        time.sleep(1.5)
        before = world.counters("usb0")[0]
        world.link_up("usb0")
        appeared = time.monotonic()
        carried = wait_for(lambda: world.counters("usb0")[0] - before > 200_000, 4, 0.05)
        assert carried, "usb0 carried nothing"
        assert time.monotonic() - appeared < 2.0
    finally:
        world.link_up("usb0")
        result = finish(proc)
    assert result["ok"], result.get("error")
    assert result["sha256"] == result["expected_sha256"]


def test_a_link_that_goes_is_dropped_and_the_transfer_survives(
    world: World, stack: BraidStack
) -> None:
    proc = background_download(world, "32M")
    try:
        time.sleep(1.5)
        world.link_down("wlan0")
        assert wait_for(lambda: link(stack, "wlan0")["state"] == "down", 1.5, 0.02)
    finally:
        result = finish(proc)
        world.link_up("wlan0")
    assert result["ok"], result.get("error")
    assert result["sha256"] == result["expected_sha256"]
    assert wait_for(lambda: link(stack, "wlan0")["carrying"], 5)


# -- priorities -----------------------------------------------------------------


def test_backup_carries_under_1_percent_while_an_always_link_works(
    world: World, stack: BraidStack
) -> None:
    stack.call("set-link", link="usb0", priority="backup")
    before = rx_bytes(world)
    result = download(world, "24M")
    share = moved(before, rx_bytes(world))
    assert result["ok"], result.get("error")
    assert share["usb0"] / sum(share.values()) < 0.01, share


def test_backup_takes_over_when_no_always_link_works(world: World, stack: BraidStack) -> None:
    stack.call("set-link", link="usb0", priority="backup")
    world.blackhole("eth0")
    world.blackhole("wlan0")
    assert wait_for(lambda: stack.status()["best_link"] == "usb0", 2)
    before = rx_bytes(world)
    result = download(world, "8M")
    share = moved(before, rx_bytes(world))
    assert result["ok"], result.get("error")
    assert share["usb0"] > 8_000_000, share


def test_never_carries_nothing(world: World, stack: BraidStack) -> None:
    stack.call("set-link", link="wlan0", priority="never")
    assert "wlan0" not in world.run("laptop", ["ip", "mptcp", "endpoint"]).stdout
    before = rx_bytes(world)
    result = download(world, "16M")
    share = moved(before, rx_bytes(world))
    assert result["ok"], result.get("error")
    assert share["wlan0"] < 20_000, share


def test_priority_change_mid_transfer_drops_nothing(world: World, stack: BraidStack) -> None:
    proc = background_download(world, "48M")
    changes = [
        threading.Timer(
            1.0, stack.call, args=("set-link",), kwargs={"link": "eth0", "priority": "backup"}
        ),
        threading.Timer(
            2.5, stack.call, args=("set-link",), kwargs={"link": "eth0", "priority": "always"}
        ),
        threading.Timer(
            3.0, stack.call, args=("set-link",), kwargs={"link": "wlan0", "priority": "never"}
        ),
    ]
    for timer in changes:
        timer.start()
    result = finish(proc)
    for timer in changes:
        timer.join()
    assert result["ok"], result.get("error")
    assert result["sha256"] == result["expected_sha256"]


def test_order_decides_the_first_link(world: World, stack: BraidStack) -> None:
    try:
        stack.call("set-order", links=["wlan0", "eth0", "usb0"])
        assert stack.status()["best_link"] == "wlan0"
    finally:
        stack.call("set-order", links=["eth0", "wlan0", "usb0"])
    assert stack.status()["best_link"] == "eth0"


def test_cellular_defaults_to_backup_and_metered(stack: BraidStack, tmp_path) -> None:
    from braid.daemon.links.model import default_priority

    assert default_priority("cellular") == "backup"
    assert link(stack, "usb0")["metered"] is True


# -- data caps ----------------------------------------------------------------------


def test_data_cap_stops_the_link_and_survives_a_restart(world: World, stack: BraidStack) -> None:
    cap = {"limit_bytes": 10**12, "period": "day", "reset_day": 1, "then": "never"}
    used = stack.call("set-link", link="usb0", cap=cap)["used_bytes"]
    cap["limit_bytes"] = used + 3_000_000
    stack.call("set-link", link="usb0", cap=cap)
    done = download(world, "32M")
    assert done["ok"], done.get("error")
    usb0 = wait_for(lambda: link(stack, "usb0")["capped"] and link(stack, "usb0"), 3)
    assert usb0, link(stack, "usb0")
    assert usb0["effective_priority"] == "never"
    assert "usb0" not in world.run("laptop", ["ip", "mptcp", "endpoint"]).stdout
    assert any(e["event"] == "cap-reached" for e in stack.status()["events"])

    stack.stop_daemon()
    stack.start_daemon()
    stack.up()
    again = link(stack, "usb0")
    assert again["capped"] is True
    assert again["used_bytes"] >= usb0["used_bytes"]
    before = rx_bytes(world)
    assert download(world, "8M")["ok"]
    assert moved(before, rx_bytes(world))["usb0"] < 20_000


# -- the control API ------------------------------------------------------------------


def as_nobody(stack: BraidStack, cmd: str, **args) -> dict:
    """One control request from a forked process that became the unprivileged user nobody."""
    from braid.client import ControlClient
    from braid.protocol.control import ControlError

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, ask, report through the pipe
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                with ControlClient(str(stack.control_path)) as client:
                    out = {"ok": True, "result": client.call(cmd, **args), "uid": os.getuid()}
            except ControlError as exc:
                out = {"ok": False, "code": exc.code, "message": exc.message, "uid": os.getuid()}
            except Exception as exc:
                out = {"ok": False, "code": "exception", "message": repr(exc), "uid": os.getuid()}
            os.write(write_end, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def test_a_non_operator_reads_status_but_cannot_change_anything(stack: BraidStack) -> None:
    status = as_nobody(stack, "status")
    assert status["uid"] == 65534
    assert status["ok"] and status["result"]["state"] in ("connected", "degraded")
    refused = as_nobody(stack, "set-link", link="eth0", priority="never")
    assert not refused["ok"] and refused["code"] == "forbidden"
    assert "braid" in refused["message"] and "group" in refused["message"]
    assert link(stack, "eth0")["priority"] == "always"
    assert as_nobody(stack, "down")["code"] == "forbidden"
    assert stack.status()["state"] in ("connected", "degraded")


def test_malformed_requests_get_errors_not_a_crash(stack: BraidStack) -> None:
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(stack.control_path))
        sock.settimeout(5)
        reader = sock.makefile("rb")
        for line in (
            b"garbage\n",
            b"{}\n",
            b'{"v":1,"cmd":"nope"}\n',
            b'{"v":1,"cmd":"set-link","link":"eth0","priority":"sometimes"}\n',
            b"[1]\n",
        ):
            sock.sendall(line)
            reply = json.loads(reader.readline())
            assert reply["ok"] is False and reply["error"]["message"], reply
        sock.sendall(b'{"v":1,"id":9,"cmd":"status"}\n')
        assert json.loads(reader.readline())["ok"] is True


def test_subscribe_streams_samples_and_events(world: World, stack: BraidStack) -> None:
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(stack.control_path))
        sock.settimeout(5)
        reader = sock.makefile("rb")
        sock.sendall(b'{"v":1,"id":1,"cmd":"subscribe"}\n')
        assert json.loads(reader.readline())["ok"] is True
        world.blackhole("usb0")
        seen: list[dict] = []
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            seen.append(json.loads(reader.readline()))
            kinds = {m["event"] for m in seen}
            if {"sample", "link-lost"} <= kinds and sum(m["event"] == "sample" for m in seen) >= 2:
                break
    sample = next(m for m in seen if m["event"] == "sample")
    assert {"rx_bps", "tx_bps", "rtt_ms", "jitter_ms", "loss", "state"} <= set(sample["links"][0])
    assert {"rx_bps", "tx_bps", "bytes_down"} <= set(sample["tunnel"])
    assert any(m["event"] == "link-lost" and m["link"] == "usb0" for m in seen)


def test_settings_round_trip_and_validation(stack: BraidStack) -> None:
    got = stack.call("get-settings")
    assert {s["key"] for s in got["schema"]} >= {"probe_interval_ms", "pool_size"}
    assert stack.call("set-settings", settings={"pool_size": 3})["pool_size"] == 3
    with pytest.raises(Exception, match="at least"):
        stack.call("set-settings", settings={"probe_interval_ms": 1})
    stack.call("set-settings", settings={"pool_size": 4})


def test_braid_links_and_watch_in_the_terminal(stack: BraidStack) -> None:
    base = [sys.executable, "-m", "braid.cli", "--control", str(stack.control_path)]
    links = subprocess.run([*base, "links"], capture_output=True, text=True, check=True)
    assert all(name in links.stdout for name in ("eth0", "wlan0", "usb0"))
    watch = subprocess.run(
        [*base, "watch", "--count", "2"], capture_output=True, text=True, check=True, timeout=20
    )
    assert watch.stdout.count("Braid ") == 2
    assert "usb0" in watch.stdout
