"""The frozen daemon and server carry real traffic, sandboxed as their systemd units have them.

The namespace test world of tests/daemon, with braid-server and braidd from the unpacked
packages instead of the Python package:

- braid-server runs as an unprivileged user with only its unit's capabilities, after the
  unit's privileged raise-mptcp-limits step; braidd runs as root with only its unit's
  capabilities (setpriv applies each unit's CapabilityBoundingSet);
- both run with memory that is never writable and executable at once (PR_SET_MDWE, what
  MemoryDenyWriteExecute= asks of the kernel);
- where strace is installed, every socket either opens (children included: nft) must be of
  a family its unit's RestrictAddressFamilies= allows.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from package_build import Built, capability_mask, setpriv_capabilities, unit_capabilities

from braid.client import DaemonUnavailable
from braid.netbed import LinkSpec, World, unavailable_reason
from braid.netbed.payload import expected_sha256
from braid.netbed.stack import BraidStack, run_traffic

pytestmark = [pytest.mark.packaging, pytest.mark.netns, pytest.mark.timeout(2400)]

LINKS = [
    LinkSpec("eth0", "ethernet", rate_mbit=50, rtt_ms=10),
    LinkSpec("wlan0", "wifi", rate_mbit=30, rtt_ms=10),
    LinkSpec("usb0", "cellular", rate_mbit=20, rtt_ms=10),
]
SERVER_UID = 65534  # stands in for the braid-server system user
PR_SET_MDWE = 65
# Sets PR_SET_MDWE_REFUSE_EXEC_GAIN (kept across execve), then runs the rest of argv.
MDWE = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    f"if libc.prctl({PR_SET_MDWE}, 1, 0, 0, 0):\n"
    "    sys.exit('PR_SET_MDWE: ' + os.strerror(ctypes.get_errno()))\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)


def unit_families(unit: Path) -> set[str]:
    for line in unit.read_text().splitlines():
        if line.startswith("RestrictAddressFamilies="):
            return set(line.split("=", 1)[1].split())
    raise AssertionError(f"{unit.name} restricts no address families")


class FrozenStack(BraidStack):
    """BraidStack with the packaged binaries, each started the way its unit starts it."""

    def __init__(self, world: World, unpacked: Path) -> None:
        super().__init__(world)
        self.braid = unpacked / "opt/braid/braid/braid"
        self.braid_server = unpacked / "opt/braid-server/braid-server"
        self.raise_limits = unpacked / "usr/lib/braid-server/raise-mptcp-limits"
        # The server's state where its unprivileged user can reach it (the world's own
        # directory is root's alone).
        self.server_home = Path(tempfile.mkdtemp(prefix="braid-server-home-"))
        self.server_home.chmod(0o711)
        self.server_dir = self.server_home / "state"
        self.traces: dict[str, Path] = {}
        units = unpacked / "lib/systemd/system"
        self.daemon_caps = unit_capabilities(units / "braidd.service")
        self.server_caps = unit_capabilities(units / "braid-server.service")
        self.strace = shutil.which("strace")

    def sandbox(self, role: str, caps: list[str]) -> list[str]:
        argv = []
        if self.strace:
            trace = Path(self.world.workdir) / f"{role}.sockets"
            self.traces[role] = trace
            argv += [self.strace, "-f", "-qq", "-e", "trace=socket,socketpair", "-o", str(trace)]
        return [*argv, sys.executable, "-c", MDWE, "setpriv", *caps, "--no-new-privs", "--"]

    def init_server(self) -> str:
        # as root, like `sudo braid-server init`; the unit hands the files over at start
        result = self.world.run(
            "server",
            [
                str(self.braid_server),
                "init",
                "--state-dir",
                str(self.server_dir),
                "--listen",
                f"[::]:{self.server_port}",
                "--public-host",
                self.public_host,
            ],
        )
        self.pairing_uri = result.stdout.strip().splitlines()[-1]
        return self.pairing_uri

    def start_server(self) -> None:
        if self.pairing_uri is None:
            self.init_server()
        # braid-server.service: ExecStartPre=+chown ..., ExecStartPre=+raise-mptcp-limits 8
        subprocess.run(["chown", "-R", f"{SERVER_UID}:{SERVER_UID}", self.server_dir], check=True)
        limits = self.world.run("server", [str(self.raise_limits), "8"])
        assert "subflows 8" in self.world.run("server", ["ip", "mptcp", "limits"]).stdout, limits
        allowed = setpriv_capabilities(self.server_caps)
        caps = [
            f"--reuid={SERVER_UID}",
            f"--regid={SERVER_UID}",
            "--clear-groups",
            f"--bounding-set={allowed}",
            f"--inh-caps={allowed}",
            f"--ambient-caps={allowed}",
        ]
        argv = [str(self.braid_server), "run", "--state-dir", str(self.server_dir)]
        self.server = self.world.popen(
            "server",
            [*self.sandbox("server", caps), *argv],
            stdout=open(self.server_log, "ab"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
        )
        self._wait_for_server(0)

    def start_daemon(self) -> None:
        caps = [f"--bounding-set={setpriv_capabilities(self.daemon_caps)}", "--inh-caps=-all"]
        argv = [
            str(self.braid),
            "--control",
            str(self.control_path),
            "daemon",
            "--state-dir",
            str(self.daemon_dir),
            "--socks",
            f"{self.socks[0]}:{self.socks[1]}",
        ]
        for link in self.links:
            argv += ["--link", link]
        self.daemon = self.world.popen(
            "laptop",
            [*self.sandbox("daemon", caps), *argv],
            stdout=open(self.daemon_log, "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise RuntimeError(
                    f"the frozen braidd exited early:\n{self.daemon_log.read_text()}"
                )
            try:
                self.call("status")
                return
            except (DaemonUnavailable, OSError):
                time.sleep(0.1)
        raise TimeoutError(f"the frozen braidd did not start:\n{self.daemon_log.read_text()}")

    def _signal(self, proc: subprocess.Popen, binary: Path, sig: int) -> None:
        """Signal the frozen program itself: behind strace, its tracer would only detach."""
        with contextlib.suppress(AssertionError, ProcessLookupError):
            os.kill(int(frozen_process_status(proc.pid, binary, wait=1)["Pid"]), sig)

    def stop_daemon(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        if self.daemon is None or self.daemon.poll() is not None:
            return None if self.daemon is None else self.daemon.returncode
        self._signal(self.daemon, self.braid, sig)
        try:
            return self.daemon.wait(timeout)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            return self.daemon.wait()

    def stop(self) -> None:
        self.stop_daemon()
        if self.server is not None and self.server.poll() is None:
            self._signal(self.server, self.braid_server, signal.SIGTERM)
            try:
                self.server.wait(10)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()

    def families(self, role: str) -> set[str]:
        text = self.traces[role].read_text()
        return set(re.findall(r"socket(?:pair)?\((AF_\w+)", text))

    def close(self) -> None:
        shutil.rmtree(self.server_home, ignore_errors=True)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with World(LINKS) as w:
        yield w


def snapshot(world: World) -> str:
    return "\n".join(
        world.run("laptop", argv).stdout
        for argv in (
            ["nft", "list", "ruleset"],
            ["ip", "-4", "rule"],
            ["ip", "-6", "rule"],
            ["ip", "mptcp", "endpoint"],
        )
    )


def test_frozen_server_and_daemon_carry_traffic(built: Built, unpacked: Path, world: World) -> None:
    pristine = snapshot(world)
    stack = FrozenStack(world, unpacked)
    try:
        stack.start()
        # the processes are the frozen ones, with the capabilities their units leave them
        for proc, binary, caps in (
            (stack.daemon, stack.braid, capability_mask(stack.daemon_caps)),
            (stack.server, stack.braid_server, capability_mask(stack.server_caps)),
        ):
            assert proc is not None
            status = frozen_process_status(proc.pid, binary)
            assert int(status["CapEff"], 16) == caps, status["CapEff"]
            assert int(status["CapBnd"], 16) == caps, status["CapBnd"]
        assert frozen_process_status(stack.server.pid, stack.braid_server)["Uid"].split()[0] == (
            str(SERVER_UID)
        )

        result = run_traffic(
            world, "download", world.target_v4, "--bytes", "8M", "--socks", "127.0.0.1:1080"
        )
        assert result["ok"], result.get("error")
        assert result["sha256"] == result["expected_sha256"]

        # system-wide mode: braidd runs nft and opens transparent sockets with those caps
        status = stack.call("up", pairing=stack.pairing_uri, mode="system")
        assert status["capture"]["in_force"] == "tunnel", status
        n = 4 << 20
        body = Path(world.workdir) / "captured.bin"
        url = f"http://{world.target_name}/bytes/{n}?seed=frozen"
        curl = ["curl", "-sS", "--fail", "--max-time", "60", "-o", str(body), url]
        done = world.run("laptop", curl, check=False, timeout=90)
        assert done.returncode == 0, done.stderr
        assert hashlib.sha256(body.read_bytes()).hexdigest() == expected_sha256(n, "frozen")

        assert stack.stop_daemon() == 0
        assert snapshot(world) == pristine  # the frozen daemon removed all it added
        if stack.strace:
            units = unpacked / "lib/systemd/system"
            daemon = stack.families("daemon")
            assert daemon <= unit_families(units / "braidd.service"), daemon
            server = stack.families("server")
            assert server <= unit_families(units / "braid-server.service"), server
            built.note(
                f"socket families opened: braidd (and nft) {sorted(daemon)}, "
                f"braid-server {sorted(server)}"
            )
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()
        stack.close()


def frozen_process_status(pid: int, binary: Path, wait: float = 10) -> dict[str, str]:
    """/proc status of the frozen program started as ``pid`` (behind strace: its child)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        for candidate in [pid, *descendants(pid)]:
            try:
                exe = os.readlink(f"/proc/{candidate}/exe")
                text = Path(f"/proc/{candidate}/status").read_text()
            except OSError:
                continue
            if Path(exe) == binary.resolve():
                return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
        time.sleep(0.1)
    raise AssertionError(f"no process runs {binary}")


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found.append(child)
            todo.append(child)
    return found
