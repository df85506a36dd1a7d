"""An interface that discovery skips becomes a link when the user adds it (braid links add), carries
subflows, is kept across a restart of braidd, and goes again with braid links remove. Real
processes in the namespace world, where every interface is a veth that discovery skips."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from braid.netbed import LinkSpec, World
from braid.netbed.stack import BraidStack, run_traffic, start_traffic, wait_for

pytestmark = pytest.mark.netns

LINKS = [
    LinkSpec("eth0", "ethernet", rate_mbit=20, rtt_ms=10),
    LinkSpec("usb0", "ethernet", rate_mbit=20, rtt_ms=10),
]
SOCKS = "127.0.0.1:1080"


@pytest.fixture(scope="module")
def stack(world: World) -> Iterator[BraidStack]:
    # braidd is told about eth0 only; usb0 (a veth, so virtual) is left to discovery, which skips it
    with BraidStack(world, links=["eth0:ethernet:always"]) as braid:
        yield braid


def braid_cli(stack: BraidStack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "braid.cli", "--control", str(stack.control_path), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def links(stack: BraidStack) -> dict[str, dict]:
    return {item["name"]: item for item in stack.call("links")}


def usb0_carries_a_download(world: World, stack: BraidStack) -> None:
    """A bulk download spreads onto usb0: a subflow from its address, and bytes through it."""
    before = world.counters("usb0")[0]
    proc = start_traffic(
        world, "download", world.target_v4, "--bytes", "24M", "--socks", SOCKS, "--timeout", "30"
    )
    try:
        assert wait_for(lambda: links(stack)["usb0"]["subflows"] >= 1, 10), links(stack)
    finally:
        out, _ = proc.communicate(timeout=120)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ok"], result.get("error")
    assert result["sha256"] == result["expected_sha256"]
    assert world.counters("usb0")[0] - before > 2_000_000


def test_a_skipped_interface_added_by_the_user_is_a_link_and_stays(
    world: World, stack: BraidStack
) -> None:
    assert set(links(stack)) == {"eth0"}
    # what the user tried first: there is no such link yet, and the answer says what to do
    refused = braid_cli(stack, "links", "set", "usb0", "--kind", "ethernet")
    assert refused.returncode == 1
    assert "no link 'usb0'" in refused.stderr and "braid links add usb0" in refused.stderr

    added = braid_cli(stack, "links", "add", "usb0", "--kind", "ethernet")
    assert added.returncode == 0, added.stderr
    assert "usb0" in added.stdout
    usb0 = links(stack)["usb0"]
    assert usb0["kind"] == "ethernet" and usb0["priority"] == "always" and usb0["added"] is True
    assert wait_for(lambda: links(stack)["usb0"]["carrying"], 5), links(stack)
    assert any(e["event"] == "link-added" for e in stack.status()["events"])
    usb0_carries_a_download(world, stack)

    stack.stop_daemon()
    stack.start_daemon()
    stack.up()
    assert set(links(stack)) == {"eth0", "usb0"}
    assert links(stack)["usb0"]["kind"] == "ethernet"
    assert wait_for(lambda: links(stack)["usb0"]["carrying"], 5), links(stack)
    usb0_carries_a_download(world, stack)

    removed = braid_cli(stack, "links", "remove", "usb0")
    assert removed.returncode == 0, removed.stderr
    assert set(links(stack)) == {"eth0"}
    assert "usb0" not in world.run("laptop", ["ip", "mptcp", "endpoint"]).stdout
    before = world.counters("usb0")[0]
    done = run_traffic(
        world, "download", world.target_v4, "--bytes", "8M", "--socks", SOCKS, "--timeout", "30"
    )
    assert done["ok"], done.get("error")
    assert world.counters("usb0")[0] - before < 100_000
    # forgotten for good: not back after a restart
    stack.stop_daemon()
    stack.start_daemon()
    stack.up()
    assert set(links(stack)) == {"eth0"}


def test_interfaces_say_which_are_links_and_why_the_others_are_not(stack: BraidStack) -> None:
    interfaces = {item["name"]: item for item in stack.call("interfaces")}
    assert "lo" not in interfaces
    assert interfaces["eth0"]["link"] is True
    assert interfaces["usb0"]["link"] is False
    assert interfaces["usb0"]["reason"] == "virtual device", interfaces["usb0"]


def test_adding_and_removing_say_why_they_refuse_and_change_nothing(stack: BraidStack) -> None:
    def shape() -> list:
        return [(x["name"], x["kind"], x["priority"], x["added"]) for x in stack.call("links")]

    before = shape()
    stored = stack.daemon_dir / "links.json"
    saved = stored.read_bytes() if stored.exists() else None
    cases = [
        (("add", "nosuch0"), "no interface 'nosuch0'"),
        (("add", "eth0"), "eth0 is already a link"),
        (("add", "usb0", "--kind", "satellite"), "invalid choice"),
        (("remove", "eth0"), "named with --link"),
        (("remove", "usb0"), "no added link 'usb0'"),
        (("add",), "name the interface"),
        (("add",), "usb0"),  # offered: not a link
        (("add", "lo"), "loopback cannot be a link"),
    ]
    for args, message in cases:
        result = braid_cli(stack, "links", *args)
        assert result.returncode != 0, args
        assert message in result.stderr, (args, result.stderr)
    assert shape() == before
    assert (stored.read_bytes() if stored.exists() else None) == saved
