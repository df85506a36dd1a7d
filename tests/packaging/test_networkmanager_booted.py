"""braidd beside a real NetworkManager (Debian 12's, 1.42) on a booted Debian (systemd-nspawn,
a network namespace of its own): NetworkManager manages two links and adds its MPTCP endpoints
for them; braidd, run from this tree in the container's network namespace and reading
NetworkManager over the container's system bus, leaves those endpoints alone (none deleted,
none doubled, through a reconnect), shows a link behind a captive portal as sign-in required
and uses it again once NetworkManager's check reaches the internet, and leaves NetworkManager's
endpoints in place when it stops.

The captive portal is NetworkManager's own connectivity check pointed at a small web server
outside the container, which answers like a portal or like the internet. docs/ARCHITECTURE.md
(NetworkManager) has the experiment this test keeps.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import booted
import pytest

pytestmark = [pytest.mark.netns, pytest.mark.timeout(300)]

NM_PACKAGES = ["libpam-systemd", "network-manager"]  # polkitd needs a logind
CHECK = "198.18.41.1"  # the connectivity-check server, outside
LINKS = {"eth1": ("198.18.40.2", "198.18.40.1"), "eth2": ("198.18.42.2", "198.18.42.1")}
NM_CONF = textwrap.dedent(
    f"""\
    [main]
    no-auto-default=*
    [connectivity]
    uri=http://{CHECK}:8080/check
    response=NetworkManager is online
    interval=5
    """
)
PORTAL_SERVER = textwrap.dedent(
    """
    import http.server, pathlib, sys
    mode = pathlib.Path(sys.argv[1])
    class Check(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            full = mode.read_text().strip() == "full"
            body = b"NetworkManager is online" if full else b"<html>sign in</html>"
            self.send_response(200 if full else 302)
            if not full:
                self.send_header("Location", "http://198.18.41.1:8080/login")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("198.18.41.1", 8080), Check).serve_forever()
    """
)
WAIT = 30.0


def wait_for(what: str, check, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def endpoints(machine: booted.Booted) -> list[tuple[str, int, str]]:
    """``ip mptcp endpoint`` as (address, id, the rest)."""
    out = []
    for line in machine.run("ip", "mptcp", "endpoint").stdout.splitlines():
        found = re.match(r"(\S+) id (\d+) (.*)", line.strip())
        if found:
            out.append((found[1], int(found[2]), found[3].strip()))
    return out


@pytest.fixture(scope="module")
def machine() -> Iterator[booted.Booted]:
    """Debian 12 booted with NetworkManager managing eth1 and eth2 (veths to a namespace
    outside, where the connectivity check answers), both connected."""
    reason = booted.unavailable()
    if reason:
        pytest.skip(reason)
    base, _ = booted.base_root(NM_PACKAGES, flavour="networkmanager")
    root = booted.fresh_copy(base, "nm")
    (root / "etc/NetworkManager/conf.d/90-test.conf").write_text(NM_CONF)
    work = Path(tempfile.mkdtemp(prefix="braid-nm-"))
    # The internet is reachable until a test says otherwise: braidd must see its links usable
    # whether or not NetworkManager's first check has run when it starts.
    (work / "mode").write_text("full")
    outside = f"brd{os.getpid()}x901-nm-isp"  # named like the test world's: swept if we die
    system = booted.Booted(root, booted.CACHE / "boot-nm.log")
    server = None
    try:
        system.start()
        subprocess.run(["ip", "netns", "add", outside], check=True)
        subprocess.run(["ip", "-n", outside, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", outside, "addr", "add", f"{CHECK}/32", "dev", "lo"], check=True)
        for i, (device, (_, gateway)) in enumerate(LINKS.items()):
            subprocess.run(
                [
                    "ip",
                    "link",
                    "add",
                    f"isp{i}",
                    "netns",
                    outside,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    device,
                    "netns",
                    str(system.pid),
                ],
                check=True,
            )
            subprocess.run(
                ["ip", "-n", outside, "addr", "add", f"{gateway}/24", "dev", f"isp{i}"], check=True
            )
            subprocess.run(["ip", "-n", outside, "link", "set", f"isp{i}", "up"], check=True)
        (work / "portal.py").write_text(PORTAL_SERVER)
        server = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                outside,
                sys.executable,
                str(work / "portal.py"),
                str(work / "mode"),
            ]
        )
        system.work = work  # type: ignore[attr-defined]
        for device, (address, gateway) in LINKS.items():
            system.run(
                "nmcli",
                "connection",
                "add",
                "type",
                "ethernet",
                "ifname",
                device,
                "con-name",
                device,
                "ipv4.method",
                "manual",
                "ipv4.addresses",
                f"{address}/24",
                "ipv4.gateway",
                gateway,
                "ipv6.method",
                "disabled",
            )
        # NetworkManager adds an endpoint for each device with a default route
        wait_for(
            "NetworkManager's endpoints",
            lambda: {a for a, _, _ in endpoints(system)} == {a for a, _ in LINKS.values()},
        )
        yield system
    except BaseException:
        print(system.journal("NetworkManager"), file=sys.stderr)
        raise
    finally:
        if server is not None:
            server.kill()
            server.wait(10)
        system.stop()
        subprocess.run(["ip", "netns", "del", outside], check=False, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


class Braidd:
    """braidd from this tree, in the container's network namespace, with its system bus."""

    def __init__(self, machine: booted.Booted) -> None:
        self.machine = machine
        self.state = Path(tempfile.mkdtemp(prefix="braid-nm-state-"))
        self.control = self.state / "control.sock"
        self.log = self.state / "braidd.log"
        bus = f"unix:path=/proc/{machine.pid}/root/run/dbus/system_bus_socket"
        env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus}
        command = [sys.executable, "-c", "from braid.cli import main; main()"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    "nsenter",
                    "-t",
                    str(machine.pid),
                    "-n",
                    *command,
                    "--control",
                    str(self.control),
                    "daemon",
                    "--state-dir",
                    str(self.state),
                    "--socks",
                    "127.0.0.1:11080",
                    "--no-discover",
                    "--link",
                    "eth1:ethernet",
                    "--link",
                    "eth2:ethernet",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        wait_for("braidd's control socket", self.control.exists)

    def links(self) -> dict[str, dict]:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                "from braid.cli import main; main()",
                "--control",
                str(self.control),
                "status",
                "--json",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return {link["name"]: link for link in json.loads(done.stdout)["links"]}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.state, ignore_errors=True)


@pytest.fixture(scope="module")
def braidd(machine: booted.Booted) -> Iterator[Braidd]:
    daemon = Braidd(machine)
    try:
        yield daemon
    except BaseException:
        print(daemon.log.read_text(errors="replace"), file=sys.stderr)
        raise
    finally:
        daemon.close()


def connectivity_check(machine: booted.Booted, mode: str) -> None:
    machine.work.joinpath("mode").write_text(mode)  # type: ignore[attr-defined]
    machine.run("nmcli", "networking", "connectivity", "check")


def test_networkmanagers_endpoints_stay_and_are_not_doubled(machine, braidd) -> None:
    before = endpoints(machine)
    assert all("subflow" in rest and "dev eth" in rest for _, _, rest in before), before
    wait_for("braidd's links", lambda: set(braidd.links()) == set(LINKS))
    time.sleep(1)  # a few reconcile passes
    assert endpoints(machine) == before  # same ids, flags and devices: none deleted or added
    log = braidd.log.read_text()
    warnings = [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]
    assert "another program's" in log, log
    assert not [line for line in warnings if "endpoint" in line], warnings


def test_a_captive_portal_is_sign_in_required_then_used(machine, braidd) -> None:
    connectivity_check(machine, "portal")
    links = wait_for(
        "sign-in required",
        lambda: (
            (found := braidd.links())
            and all(link["connectivity"] == "portal" for link in found.values())
            and found
        ),
    )
    for link in links.values():
        assert link["state"] == "up" and link["alive"] is None and not link["carrying"]
    assert "lookup 184" not in machine.run("ip", "rule").stdout  # not routed
    connectivity_check(machine, "full")
    wait_for(
        "signed in",
        lambda: all(link["connectivity"] == "full" for link in braidd.links().values()),
    )
    rules = wait_for("braidd's rules", lambda: machine.run("ip", "rule").stdout.count("proto 98"))
    assert rules == len(LINKS)
    events = braidd.log.read_text()
    assert "needs you to sign in" in events and "is signed in: carrying traffic" in events


def test_a_reconnect_leaves_one_endpoint_per_address(machine, braidd) -> None:
    machine.run("nmcli", "connection", "up", "eth1")
    address = LINKS["eth1"][0]
    wait_for(
        "eth1's endpoint back",
        lambda: [a for a, _, _ in endpoints(machine)].count(address) == 1,
    )
    time.sleep(1.5)
    found = [a for a, _, _ in endpoints(machine)]
    assert sorted(found) == sorted({a for a, _ in LINKS.values()}), found
    wait_for("eth1 up again in braidd", lambda: braidd.links()["eth1"]["state"] == "up")


def test_braidd_stops_and_networkmanagers_endpoints_stay(machine, braidd) -> None:
    before = endpoints(machine)
    braidd.stop()
    assert endpoints(machine) == before
    assert "proto 98" not in machine.run("ip", "rule").stdout
    with contextlib.suppress(FileNotFoundError):
        assert "Traceback" not in braidd.log.read_text()
