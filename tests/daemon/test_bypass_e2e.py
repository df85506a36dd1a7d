"""Bypass by domain in system-wide mode, end to end: a bypassed name's connections leave directly
from the laptop's link (the target's access log shows its address), others go through the server,
and DNS for every name, bypassed or not, still goes through the tunnel.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace

import pytest

from braid.netbed import LinkSpec, World, nsutil
from braid.netbed.dns import DnsServer, braid_zone
from braid.netbed.stack import BraidStack
from braid.netbed.world import child_env

pytestmark = pytest.mark.netns

LINKS = [
    LinkSpec("eth0", "ethernet", rate_mbit=50, rtt_ms=10),
    LinkSpec("wlan0", "wifi", rate_mbit=30, rtt_ms=20),
]
BYPASSED = "www.stream.braid.test"  # below the bypassed "stream.braid.test"
OTHER = "other.braid.test"


@pytest.fixture(scope="module")
def pristine(world: World) -> str:
    return world.network_state()


@pytest.fixture(scope="module")
def resolver(world: World) -> Iterator[str]:
    """The server resolves through a DNS server that knows BYPASSED (the targets' addresses) and
    OTHER (the spare addresses of the same target)."""
    address = "198.19.0.54"
    world.run("inet", ["ip", "address", "add", f"{address}/32", "dev", "lo"])
    zone = braid_zone(world.target_v4, world.target_v6)
    records = {
        **zone.records,
        BYPASSED: {"A": [world.target_v4], "AAAA": [world.target_v6]},
        OTHER: {"A": [world.spare_v4], "AAAA": [world.spare_v6]},
    }
    with nsutil.entered(world.ns("inet")):
        server = DnsServer([address], zone=replace(zone, records=records)).start()
    conf = nsutil.NETNS_ETC_DIR / world.ns("server") / "resolv.conf"
    before = conf.read_text()
    try:
        conf.write_text(f"nameserver {address}\noptions timeout:1 attempts:1\n")
        yield address
    finally:
        conf.write_text(before)
        server.close()
        world.run("inet", ["ip", "address", "del", f"{address}/32", "dev", "lo"], check=False)


@pytest.fixture(scope="module")
def stack(world: World, pristine: str, resolver: str) -> Iterator[BraidStack]:
    with BraidStack(world) as braid:
        status = braid.call("up", pairing=braid.pairing_uri, mode="system")
        assert status["capture"]["in_force"] == "tunnel", status
        braid.call("set-settings", settings={"bypass": ["stream.braid.test"]})
        yield braid


def fetch(world: World, family: int, host: str, seed: str) -> dict:
    done = world.run(
        "laptop",
        [
            "curl",
            f"-{family}",
            "-sS",
            "--fail",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            f"http://{host}/bytes/1000?seed={seed}",
        ],
        check=False,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return world.wait_access(lambda e: f"seed={seed}" in e.get("path", ""))


@contextlib.contextmanager
def no_dns_on_links(world: World) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        captures = [
            stack.enter_context(world.capture("laptop", spec.name, "port 53")) for spec in LINKS
        ]
        yield
    leaked = [p for c in captures for p in c.packets()]
    assert leaked == [], leaked


def bypass_set(world: World, version: int) -> str:
    done = world.run("laptop", ["nft", "-j", "list", "set", "inet", "braid", f"bypass{version}"])
    return json.dumps(json.loads(done.stdout))


@pytest.mark.parametrize("family", [4, 6])
def test_a_bypassed_name_leaves_directly_and_others_through_the_server(
    world: World, stack: BraidStack, family: int
) -> None:
    with no_dns_on_links(world):
        direct = fetch(world, family, BYPASSED, f"byp{family}")
        other = fetch(world, family, OTHER, f"oth{family}")
    assert direct["client"] == world.laptop_addr("eth0", family), direct
    assert other["client"] in (world.server_v4, world.server_v6), other
    target = world.target_v4 if family == 4 else world.target_v6
    spare = world.spare_v4 if family == 4 else world.spare_v6
    listed = bypass_set(world, family)
    assert target in listed and "timeout" in listed, listed
    assert spare not in listed


def test_an_address_is_carried_again_once_its_name_is_no_longer_bypassed(
    world: World, stack: BraidStack
) -> None:
    fetch(world, 4, BYPASSED, "again1")
    stack.call("set-settings", settings={"bypass": []})
    try:
        # The learned addresses stay until their TTL; new answers are no longer learned.
        world.run("laptop", ["nft", "flush", "set", "inet", "braid", "bypass4"])
        entry = fetch(world, 4, BYPASSED, "again2")
        assert entry["client"] in (world.server_v4, world.server_v6), entry
        assert world.target_v4 not in bypass_set(world, 4)
    finally:
        stack.call("set-settings", settings={"bypass": ["stream.braid.test"]})


@pytest.mark.parametrize("bad", ["exa mple.com", "stream..test", "192.0.2.300", "-x.test"])
def test_a_bad_entry_is_refused_and_nothing_changes(
    world: World, stack: BraidStack, bad: str
) -> None:
    settings_file = stack.daemon_dir / "settings.json"
    before = settings_file.read_text()
    with pytest.raises(Exception, match="not an address"):
        stack.call("set-settings", settings={"bypass": ["ok.test", bad]})
    assert settings_file.read_text() == before
    assert stack.call("get-settings")["values"]["bypass"] == ["stream.braid.test"]


def test_stopping_restores_the_network_state(
    world: World, stack: BraidStack, pristine: str
) -> None:
    fetch(world, 4, BYPASSED, "stop")
    stack.stop_daemon()
    assert world.network_state() == pristine
    stack.start_daemon()
    status = stack.call("up", pairing=stack.pairing_uri, mode="system")
    assert status["capture"]["in_force"] == "tunnel"


def braid_cli(stack: BraidStack, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "braid.cli", "--control", str(stack.control_path), *argv],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
        env=child_env(),
    )


def test_the_command_line_adds_lists_and_removes_entries(world: World, stack: BraidStack) -> None:
    added = braid_cli(stack, "bypass", "add", "Example.ORG", "192.0.2.7", "2001:db8:1::/48")
    assert added.returncode == 0, added.stderr
    assert added.stdout.split() == [
        "stream.braid.test",
        "example.org",
        "192.0.2.7/32",
        "2001:db8:1::/48",
    ]
    listed = braid_cli(stack, "bypass", "list", "--json")
    assert json.loads(listed.stdout) == added.stdout.split()
    # The new network is in the ruleset at once.
    assert (
        "192.0.2.7"
        in world.run("laptop", ["nft", "list", "set", "inet", "braid", "direct4"]).stdout
    )
    settings_file = stack.daemon_dir / "settings.json"
    before = settings_file.read_text()
    bad = braid_cli(stack, "bypass", "add", "ok.test", "not a name")
    assert bad.returncode == 2 and "'not a name' is not an address" in bad.stderr
    missing = braid_cli(stack, "bypass", "remove", "nowhere.test")
    assert missing.returncode == 1 and "not in the list: nowhere.test" in missing.stderr
    assert settings_file.read_text() == before
    removed = braid_cli(stack, "bypass", "remove", "example.org", "192.0.2.7", "2001:db8:1::/48")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.split() == ["stream.braid.test"]
