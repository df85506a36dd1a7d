"""Bypass by application, end to end: ``braid direct -- CMD`` in system-wide mode and
``braid bonded -- CMD`` in proxy mode, with a real braidd, its own cgroups and real nftables.

The target's access and UDP logs tell who reached it: the laptop's link address (direct) or
the server's (through Braid). braidd's cgroups are named after the test world's laptop
namespace, made when braidd starts and gone when it stops.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from braid.daemon.routing.apps import cgroup2_mounts
from braid.netbed import LinkSpec, World
from braid.netbed.stack import BraidStack, wait_for

pytestmark = pytest.mark.netns

LINKS = [
    LinkSpec("eth0", "ethernet", rate_mbit=50, rtt_ms=10),
    LinkSpec("wlan0", "wifi", rate_mbit=30, rtt_ms=20),
]


def cgroup_root() -> Path:
    mounts = cgroup2_mounts(Path("/proc/self/mountinfo").read_text())
    if not mounts:
        pytest.skip("no cgroup v2 hierarchy on this machine")
    return mounts[0]


@pytest.fixture(scope="module")
def pristine(world: World) -> str:
    return world.network_state()


@pytest.fixture(scope="module")
def stack(world: World, pristine: str) -> Iterator[BraidStack]:
    cgroup_root()
    with BraidStack(world) as braid:
        status = braid.call("up", pairing=braid.pairing_uri, mode="system")
        assert status["capture"]["in_force"] == "tunnel", status
        yield braid
    assert not (cgroup_root() / braid.cgroup).exists()


def braid_cli(world: World, stack: BraidStack, *argv: str) -> subprocess.CompletedProcess:
    return world.run(
        "laptop",
        [sys.executable, "-m", "braid.cli", "--control", str(stack.control_path), *argv],
        check=False,
        timeout=60,
    )


def curl(seed: str, world: World) -> list[str]:
    return ["curl", "-sS", "--fail", "--max-time", "10", "-o", "/dev/null",
            f"http://{world.target_v4}/bytes/1000?seed={seed}"]  # fmt: skip


def client_of(world: World, seed: str) -> str:
    return world.wait_access(lambda e: f"seed={seed}" in e.get("path", ""))["client"]


def _commands_in(group: Path) -> set[str]:
    names = set()
    for pid in (group / "cgroup.procs").read_text().split():
        with contextlib.suppress(OSError):
            names.add(Path(f"/proc/{pid}/comm").read_text().strip())
    return names


def test_braidd_makes_its_own_cgroups(stack: BraidStack) -> None:
    base = cgroup_root() / stack.cgroup
    assert (base / "direct").is_dir() and (base / "bonded").is_dir()


def test_braid_direct_goes_direct_in_system_wide_mode(world: World, stack: BraidStack) -> None:
    done = braid_cli(world, stack, "direct", "--", *curl("app-direct", world))
    assert done.returncode == 0, done.stderr
    assert client_of(world, "app-direct") == world.laptop_addr("eth0")
    echo = braid_cli(
        world,
        stack,
        "direct",
        "--",
        sys.executable,
        "-m",
        "braid.netbed.traffic",
        "echo",
        world.target_v4,
        "--count",
        "3",
    )
    assert echo.returncode == 0, echo.stderr
    assert world.udp_log()[-1]["client"] == world.laptop_addr("eth0")
    # The same command without braid direct is carried by the tunnel.
    plain = world.run("laptop", curl("app-plain", world), check=False, timeout=30)
    assert plain.returncode == 0, plain.stderr
    assert client_of(world, "app-plain") in (world.server_v4, world.server_v6)
    # The group empties as its programs end.
    assert (cgroup_root() / stack.cgroup / "direct" / "cgroup.procs").read_text() == ""


def test_braid_bonded_goes_through_braid_in_proxy_mode(world: World, stack: BraidStack) -> None:
    stack.call("set-settings", settings={"mode": "proxy"})
    try:
        plain = world.run("laptop", curl("bonded-plain", world), check=False, timeout=30)
        assert plain.returncode == 0, plain.stderr
        assert client_of(world, "bonded-plain") == world.laptop_addr("eth0")
        done = braid_cli(world, stack, "bonded", "--", *curl("app-bonded", world))
        assert done.returncode == 0, done.stderr
        assert client_of(world, "app-bonded") in (world.server_v4, world.server_v6)
        # Others stay direct, and only the bonded rule is in Braid's table.
        again = world.run("laptop", curl("bonded-plain2", world), check=False, timeout=30)
        assert again.returncode == 0 and client_of(world, "bonded-plain2") == world.laptop_addr(
            "eth0"
        )
        assert stack.status()["capture"]["active"] is False
        table = world.run("laptop", ["nft", "list", "table", "inet", "braid"]).stdout
        assert "socket cgroupv2" in table and "reject" not in table
    finally:
        stack.call("set-settings", settings={"mode": "system"})
    assert wait_for(lambda: stack.status()["capture"]["in_force"] == "tunnel", 30)


def test_a_bonded_program_stays_bonded_across_a_restart_of_braidd(
    world: World, stack: BraidStack, tmp_path: Path
) -> None:
    """The group outlives braidd while it holds a program, and the next braidd uses it again."""
    go = tmp_path / "go"
    url = f"http://{world.target_v4}/bytes/1000?seed=restarted"
    waiting = f"for i in $(seq 1 300); do [ -e {go} ] && break; sleep 0.1; done; curl -sS --fail --max-time 10 -o /dev/null {url}"
    stack.call("set-settings", settings={"mode": "proxy"})
    program = world.popen(
        "laptop",
        [sys.executable, "-m", "braid.cli", "--control", str(stack.control_path), "bonded",
         "--", "sh", "-c", waiting],
    )  # fmt: skip
    try:
        group = cgroup_root() / stack.cgroup / "bonded"
        # In the group, and past braidd's answer: `braid bonded` has become the program. (A pid
        # in the group alone is not enough: a braidd stopped before it answered fails the
        # request, and `braid bonded` then exits instead of running the program.)
        assert wait_for(lambda: "sh" in _commands_in(group), 10)
        stack.stop_daemon()
        assert group.is_dir()  # still holds the program
        stack.start_daemon()
        stack.call("up", pairing=stack.pairing_uri)  # proxy mode, as it was
        go.touch()
        assert program.wait(30) == 0
        assert client_of(world, "restarted") in (world.server_v4, world.server_v6)
    finally:
        program.kill()
        program.wait(5)
        stack.call("set-settings", settings={"mode": "system"})
    assert wait_for(lambda: stack.status()["capture"]["in_force"] == "tunnel", 30)


def test_bad_commands_are_refused_before_anything_runs(world: World, stack: BraidStack) -> None:
    nothing = braid_cli(world, stack, "direct")
    assert nothing.returncode == 2 and "give the command to run" in nothing.stderr
    missing = braid_cli(world, stack, "bonded", "--", "no-such-program-here")
    assert missing.returncode == 127 and "no such command" in missing.stderr
    stack.call("down")
    try:
        down = braid_cli(world, stack, "bonded", "--", "true")
        assert down.returncode == 1 and "not connected" in down.stderr, down.stderr
    finally:
        status = stack.call("up", pairing=stack.pairing_uri, mode="system")
        assert status["capture"]["in_force"] == "tunnel"


def test_stopping_and_cleanup_remove_the_cgroups_and_rules(
    world: World, stack: BraidStack, pristine: str
) -> None:
    base = cgroup_root() / stack.cgroup
    stack.stop_daemon()
    assert not base.exists()
    assert world.network_state() == pristine
    stack.start_daemon()
    assert base.exists()
    stack.stop_daemon(signal.SIGKILL)
    assert base.exists()
    assert stack.cleanup_daemon().returncode == 0
    assert not base.exists()
    assert world.network_state() == pristine
    stack.start_daemon()
    status = stack.call("up", pairing=stack.pairing_uri, mode="system")
    assert status["capture"]["in_force"] == "tunnel"
