"""The packages installed with apt-get on a booted Debian 12 (systemd-nspawn, a network namespace
of its own): the units start, the journal gets priorities, the braid group decides who drives
braidd, a link added by the user carries downloads in proxy and system-wide mode to a
braid-server outside, braidd stops in under a second with the server there or gone, and
`apt remove` / `apt purge` leave nothing behind.

The tests run in order on one booted system, each building on the one before. The
debootstrapped root is kept in test-output/booted/ and copied for each run. The figures
(debootstrap, copy, boot, install, stop) go to test-output/packaging.txt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import booted
import pytest
from package_build import Built

pytestmark = [pytest.mark.packaging, pytest.mark.netns, pytest.mark.timeout(2400)]

SERVER_PORT = 7443
# the container's eth0 and the server's side of it; the server's side towards the target
LAPTOP, SERVER, SERVER_TO_TARGET, TARGET = (
    "198.18.30.2",
    "198.18.30.1",
    "198.18.31.1",
    "198.18.31.2",
)
BLOB_SIZE = 8 * 1024 * 1024
STOP_LIMIT = 1.0
STOP_TIMEOUT = 20
BRAID_RULES = re.compile(r"^18(399|4[0-3]\d):", re.MULTILINE)  # braidd's rule priorities


def depends(deb: Path) -> set[str]:
    field = subprocess.run(
        ["dpkg-deb", "--field", str(deb), "Depends"], capture_output=True, text=True, check=True
    ).stdout
    return {re.split(r"[\s(]", item.strip())[0] for item in field.split(",") if item.strip()}


@pytest.fixture(scope="module")
def system(built: Built) -> Iterator[booted.Booted]:
    """Debian 12 booted, with braid and braid-server installed by apt-get inside."""
    reason = booted.unavailable()
    if reason:
        pytest.skip(reason)
    base, seconds = booted.base_root(
        sorted((depends(built.laptop) | depends(built.server)) - {"libc6"})
    )
    built.note(
        f"booted system: debootstrap {seconds:.0f} s"
        if seconds is not None
        else "booted system: debootstrapped root cached in test-output/booted"
    )
    started = time.monotonic()
    root = booted.fresh_copy(base)
    built.note(f"booted system: copy of the root {time.monotonic() - started:.1f} s")
    machine = booted.Booted(root, booted.CACHE / "boot.log")  # the last run's console
    try:
        built.note(f"booted system: boot {machine.start():.1f} s")
        # the MPTCP limits and path manager before braidd ever ran
        machine.before = [  # type: ignore[attr-defined]
            machine.run("ip", "mptcp", "limits").stdout,
            machine.run("cat", "/proc/sys/net/mptcp/path_manager").stdout,
        ]
        debs = root / "root" / "debs"
        debs.mkdir()
        for deb in (built.laptop, built.server):
            shutil.copy(deb, debs)
        started = time.monotonic()
        machine.run(
            "apt-get",
            "install",
            "-y",
            "--no-install-recommends",
            f"/root/debs/{built.laptop.name}",
            f"/root/debs/{built.server.name}",
            timeout=600,
        )
        built.note(
            f"booted system: apt-get install of both packages {time.monotonic() - started:.1f} s"
        )
        yield machine
    except BaseException:
        print(machine.journal(), file=sys.stderr)
        raise
    finally:
        machine.stop()
        shutil.rmtree(root, ignore_errors=True)


def ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def outside(system: booted.Booted) -> Iterator[dict]:
    """A braid-server and a web server in namespaces outside the container, which gets eth0:
    a veth into the server's namespace (discovery skips a veth: the user must add it)."""
    # named like the test world's namespaces, so that a run that died has them swept
    tag = f"brd{os.getpid()}x900"
    server_ns, target_ns = f"{tag}-boot-server", f"{tag}-boot-target"
    work = Path(tempfile.mkdtemp(prefix="braid-booted-"))
    processes: list[subprocess.Popen] = []
    try:
        for ns in (server_ns, target_ns):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            ip(ns, "link", "set", "lo", "up")
        ip(
            server_ns,
            "link",
            "add",
            "laptop",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            str(system.pid),
        )
        ip(
            server_ns,
            "link",
            "add",
            "target",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            target_ns,
        )
        ip(server_ns, "addr", "add", f"{SERVER}/24", "dev", "laptop")
        ip(server_ns, "addr", "add", f"{SERVER_TO_TARGET}/24", "dev", "target")
        ip(target_ns, "addr", "add", f"{TARGET}/24", "dev", "eth0")
        for ns, dev in ((server_ns, "laptop"), (server_ns, "target"), (target_ns, "eth0")):
            ip(ns, "link", "set", dev, "up")
        system.run("ip", "addr", "add", f"{LAPTOP}/24", "dev", "eth0")
        system.run("ip", "link", "set", "eth0", "up")
        system.run("ip", "route", "add", "default", "via", SERVER)

        blob = os.urandom(BLOB_SIZE)
        (work / "www").mkdir()
        (work / "www" / "blob").write_bytes(blob)
        web = ["ip", "netns", "exec", target_ns, sys.executable, "-m", "http.server"]
        processes.append(
            subprocess.Popen(
                [*web, "8080", "--bind", TARGET, "--directory", str(work / "www")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        server = [sys.executable, "-m", "braid.server.cli"]
        state = work / "server-state"
        init = subprocess.run(
            ["ip", "netns", "exec", server_ns, *server, "init", "--state-dir", str(state),
             "--listen", f"0.0.0.0:{SERVER_PORT}", "--public-host", SERVER],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        log = open(work / "braid-server.log", "wb")  # noqa: SIM115 - the child owns it
        processes.append(
            subprocess.Popen(
                ["ip", "netns", "exec", server_ns, *server, "run", "--state-dir", str(state)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        for _ in range(100):
            if "listening on" in (work / "braid-server.log").read_text():
                break
            time.sleep(0.1)
        yield {
            "server_ns": server_ns,
            "pairing": init.stdout.strip().splitlines()[-1],
            "sha256": hashlib.sha256(blob).hexdigest(),
            "server_log": work / "braid-server.log",
        }
    finally:
        for proc in processes:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for ns in (server_ns, target_ns):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def wait_until(predicate, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def active(system: booted.Booted, unit: str) -> str:
    return system.run("systemctl", "is-active", unit, check=False).stdout.strip()


def start_braidd(system: booted.Booted) -> None:
    """systemctl start, then wait until braidd answers (Type=simple: started is not ready)."""
    system.run("systemctl", "start", "braidd")
    assert wait_until(lambda: system.run("braid", "status", check=False).returncode == 0, 15), (
        system.journal("braidd")
    )


def status(system: booted.Booted) -> dict:
    return json.loads(system.run("braid", "status", "--json").stdout)


def test_braidd_and_braid_server_run_under_their_units(system: booted.Booted) -> None:
    assert wait_until(lambda: active(system, "braidd") == "active", 10), system.journal("braidd")
    pid = system.run("systemctl", "show", "-p", "MainPID", "--value", "braidd").stdout.strip()
    caps = system.run("grep", "^CapEff", f"/proc/{pid}/status").stdout.split()[1]
    assert int(caps, 16) == (1 << 10) | (1 << 12) | (1 << 13)  # NET_BIND_SERVICE, ADMIN, RAW

    system.run(
        "braid-server", "init", "--state-dir", "/var/lib/braid-server",
        "--listen", f"[::]:{SERVER_PORT}", "--public-host", LAPTOP,
    )  # fmt: skip
    system.run("systemctl", "enable", "--now", "braid-server")
    assert wait_until(lambda: active(system, "braid-server") == "active", 10)
    assert wait_until(lambda: "listening on" in system.journal("braid-server"), 10), system.journal(
        "braid-server"
    )
    user = system.run("ps", "-o", "user=", "-C", "braid-server").stdout.split()
    assert user and set(user) == {"braid-server"}, user


def test_the_journal_has_priorities_and_one_timestamp(system: booted.Booted) -> None:
    # an unreadable settings file is an error braidd logs (and keeps aside) at its next start
    system.run("systemctl", "stop", "braidd")
    system.run("sh", "-c", "echo '{not json' > /var/lib/braid/settings.json")
    system.run("systemctl", "start", "braidd")
    # a stranger's TLS connection is rejected by braid-server with a warning
    system.run("curl", "-sk", "--max-time", "5", f"https://127.0.0.1:{SERVER_PORT}/", check=False)

    def entries(unit: str, *args: str) -> list[dict]:
        out = system.run("journalctl", "--no-pager", "-o", "json", "-u", unit, *args).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def warnings() -> list[str]:
        return [e["MESSAGE"] for e in entries("braidd", "-p", "warning")]

    assert wait_until(
        lambda: any("settings.json could not be read" in m for m in warnings()), 10
    ), system.journal("braidd")
    ready = [e for e in entries("braidd") if "braidd ready" in e["MESSAGE"]]
    assert ready and {e["PRIORITY"] for e in ready} == {"6"}, ready
    unreadable = [e for e in entries("braidd") if "could not be read" in e["MESSAGE"]]
    assert unreadable[-1]["PRIORITY"] == "3", unreadable  # an error
    assert not any("braidd ready" in m for m in warnings()), warnings()
    stamp = re.compile(r"^(<\d>)?\d{4}-\d\d-\d\d[ T]\d\d:")
    for unit in ("braidd", "braid-server"):
        for entry in entries(unit):
            message = entry["MESSAGE"]
            assert isinstance(message, str) and not stamp.match(message), message
            assert not message.startswith("<"), message
    # the unit lets braidd set the MPTCP path manager (ProtectKernelTunables makes /proc/sys
    # read-only otherwise, and every connection then used every link from its start)
    assert "Read-only file system" not in system.journal("braidd")
    assert any("path manager: userspace" in e["MESSAGE"] for e in entries("braidd"))
    assert wait_until(
        lambda: any("rejected" in e["MESSAGE"] for e in entries("braid-server", "-p", "warning")),
        5,
    ), system.journal("braid-server")


def test_members_of_the_braid_group_drive_braidd_and_others_only_read(
    system: booted.Booted,
) -> None:
    system.run("useradd", "-m", "-G", "braid", "alice")
    system.run("useradd", "-m", "bob")
    member = system.run("braid", "status", user="alice")
    assert "SOCKS5 proxy" in member.stdout
    assert system.run("braid", "down", user="alice").returncode == 0
    assert "SOCKS5 proxy" in system.run("braid", "status", user="bob").stdout
    refused = system.run("braid", "down", user="bob", check=False)
    assert refused.returncode == 4, refused
    assert "braid" in refused.stderr and "group" in refused.stderr, refused.stderr
    refused = system.run("braid", "links", "add", "eth0", user="bob", check=False)
    assert refused.returncode == 4, refused


def download(system: booted.Booted, *curl: str) -> str:
    out = system.run(
        "curl", "-sf", "--max-time", "60", *curl, f"http://{TARGET}:8080/blob", "-o", "/tmp/blob"
    )
    assert out.returncode == 0
    return system.run("sha256sum", "/tmp/blob").stdout.split()[0]


def test_a_link_the_user_adds_carries_downloads_in_proxy_and_system_wide_mode(
    system: booted.Booted, outside: dict
) -> None:
    assert "eth0" not in [link["name"] for link in status(system)["links"]]  # a veth: skipped
    system.run("braid", "links", "add", "eth0", "--kind", "ethernet", user="alice")
    up = system.run("braid", "up", "--pairing", outside["pairing"], user="alice", check=False)
    assert up.returncode == 0, (up.stdout, up.stderr, system.journal("braidd"))
    assert wait_until(lambda: status(system)["state"] == "connected", 15), status(system)
    assert download(system, "--socks5-hostname", "127.0.0.1:1080") == outside["sha256"]

    system.run("braid", "up", "--mode", "system", user="alice")
    assert wait_until(lambda: status(system)["capture"]["in_force"] == "tunnel", 10), status(system)
    assert system.run("nft", "list", "table", "inet", "braid", check=False).returncode == 0
    flows = status(system)["tunnel"]["flows_total"]
    # No proxy option: nftables captures it. The server's namespace does not forward, so the
    # target is out of reach of the container but through the tunnel.
    assert download(system) == outside["sha256"]
    assert status(system)["tunnel"]["flows_total"] > flows
    system.run("braid", "up", "--mode", "proxy", user="alice")
    assert system.run("nft", "list", "table", "inet", "braid", check=False).returncode != 0


def timed_stop(system: booted.Booted) -> float:
    started = time.monotonic()
    system.run("systemctl", "stop", "braidd", timeout=STOP_TIMEOUT)
    took = time.monotonic() - started
    assert active(system, "braidd") == "inactive"
    return took


def test_braidd_stops_in_under_a_second_with_the_server_there_or_gone(
    system: booted.Booted, outside: dict, built: Built
) -> None:
    assert status(system)["state"] == "connected"
    reachable = timed_stop(system)
    start_braidd(system)
    system.run("braid", "up", user="alice")
    assert wait_until(lambda: status(system)["state"] == "connected", 15), status(system)
    blackhole = (
        "table inet blackhole {\n"
        " chain input { type filter hook input priority -10; policy drop; }\n"
        " chain output { type filter hook output priority -10; policy drop; }\n"
        "}\n"
    )
    subprocess.run(
        ["ip", "netns", "exec", outside["server_ns"], "nft", "-f", "-"],
        input=blackhole, text=True, check=True,
    )  # fmt: skip
    try:
        gone = timed_stop(system)
    finally:
        subprocess.run(
            ["ip", "netns", "exec", outside["server_ns"], "nft", "delete", "table", "inet", "blackhole"],
            check=False,
        )  # fmt: skip
    built.note(
        f"booted system: systemctl stop braidd {reachable:.2f} s with the server reachable, "
        f"{gone:.2f} s with it gone (blackholed)"
    )
    assert reachable < STOP_LIMIT and gone < STOP_LIMIT
    start_braidd(system)


def newer_package(deb: Path, out: Path) -> Path:
    """The same package with a higher version: what an upgrade installs over it."""
    tree = out / "tree"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN" / "control"
    text = control.read_text()
    version = re.search(r"^Version: (.+)$", text, re.MULTILINE).group(1)  # type: ignore[union-attr]
    control.write_text(text.replace(f"Version: {version}", f"Version: {version}+upgrade1"))
    newer = out / deb.name.replace(f"_{version}_", f"_{version}+upgrade1_")
    subprocess.run(
        ["dpkg-deb", "-Zgzip", "-z1", "--root-owner-group", "-b", str(tree), str(newer)],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(tree)
    return newer


def test_an_upgrade_keeps_links_settings_and_pairing(
    system: booted.Booted, outside: dict, built: Built, tmp_path: Path
) -> None:
    system.run("braid", "up", "--mode", "system", user="alice")
    system.run("braid", "links", "set", "eth0", "--metered", user="alice")
    newer = newer_package(built.laptop, tmp_path)
    shutil.copy(newer, system.root / "root" / "debs")
    started = time.monotonic()
    system.run("apt-get", "install", "-y", f"/root/debs/{newer.name}", timeout=600)
    built.note(
        f"booted system: upgrade (apt-get install of a newer braid) {time.monotonic() - started:.1f} s"
    )
    version = system.run("dpkg-query", "-W", "-f", "${Version}", "braid").stdout
    assert version.endswith("+upgrade1"), version
    assert wait_until(lambda: system.run("braid", "status", check=False).returncode == 0, 15), (
        system.journal("braidd")
    )
    after = status(system)
    assert after["mode"] == "system"
    eth0 = next(link for link in after["links"] if link["name"] == "eth0")
    assert eth0["added"] is True and eth0["kind"] == "ethernet" and eth0["metered"] is True
    # the pairing: `braid up` without a URI reconnects to the same server
    system.run("braid", "up", user="alice")
    assert wait_until(lambda: status(system)["state"] == "connected", 15), status(system)
    assert status(system)["server"] == f"{SERVER}:{SERVER_PORT}"
    assert download(system) == outside["sha256"]  # system-wide, as before the upgrade
    system.run("braid", "up", "--mode", "proxy", user="alice")


def test_remove_leaves_nothing_behind_and_purge_removes_the_state(system: booted.Booted) -> None:
    system.run("braid", "up", user="alice", check=False)  # tables, rules, endpoints in place
    assert wait_until(lambda: "18400" in system.run("ip", "rule").stdout, 10)
    system.run("apt-get", "remove", "-y", "braid", timeout=300)
    state = system.network_state()
    assert not BRAID_RULES.search(system.run("ip", "-4", "rule").stdout), state
    assert not BRAID_RULES.search(system.run("ip", "-6", "rule").stdout), state
    assert "table 184" not in state and "braid" not in state, state
    assert system.run("ip", "mptcp", "endpoint").stdout.strip() == ""
    assert [
        system.run("ip", "mptcp", "limits").stdout,
        system.run("cat", "/proc/sys/net/mptcp/path_manager").stdout,
    ] == system.before  # type: ignore[attr-defined]
    assert system.run("test", "-d", "/var/lib/braid", check=False).returncode == 0
    system.run("apt-get", "purge", "-y", "braid", timeout=300)
    assert system.run("test", "-e", "/var/lib/braid", check=False).returncode != 0
    assert system.run("getent", "group", "braid", check=False).returncode == 0  # Debian keeps it
