"""A local user floods braidd: idle control connections and SOCKS5 connections as uid 65534.

Real braidd started as systemd's default would start it (soft open-files limit 1024); its
descriptors are counted in /proc. Each test prints its figures (run with -s to see them).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from braid.client import ControlClient
from braid.daemon import limits
from braid.netbed import LinkSpec, World
from braid.netbed.stack import BraidStack, run_traffic, wait_for
from braid.netbed.world import child_env

pytestmark = pytest.mark.netns

LINKS = [LinkSpec("eth0", "ethernet", rate_mbit=50, rtt_ms=10)]
NOBODY = 65534
FLOOD = 1100

# Opens COUNT connections as uid 65534 and holds them until its stdin closes. Everything it
# needs is imported before it drops root (the interpreter's files may not be readable after).
FLOODER = textwrap.dedent(
    """
    import encodings.idna, errno, json, os, resource, socket, sys, time
    kind, where, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    held, failed = [], 0
    for _ in range(count):
        if kind == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address = where
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            host, port = where.rsplit(":", 1)
            address = (host, int(port))
        if kind != "unix":  # TCP: one handshake after the other, as a client would
            try:
                s.settimeout(5)
                s.connect(address)
                held.append(s)
            except OSError:
                s.close()
                failed += 1
            continue
        s.setblocking(False)
        for _attempt in range(500):  # a full backlog says EAGAIN: wait for braidd to accept
            err = s.connect_ex(address)
            if err not in (errno.EAGAIN, errno.EINPROGRESS, errno.EALREADY):
                break
            time.sleep(0.01)
        if err in (0, errno.EINPROGRESS, errno.EALREADY, errno.EISCONN):
            held.append(s)
        else:
            s.close()
            failed += 1
    print(json.dumps({"connected": len(held), "failed": failed}), flush=True)
    sys.stdin.read()
    """
)


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-files line in /proc/PID/limits")


@pytest.fixture(scope="module")
def stack(world: World) -> Iterator[BraidStack]:
    # As systemd starts a service that sets no LimitNOFILE: soft 1024, the hard limit above.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        braid = BraidStack(world).__enter__()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    # uid 65534 must reach the control socket in the world's (private) directory.
    mode = Path(world.workdir).stat().st_mode & 0o777
    os.chmod(world.workdir, mode | 0o011)
    try:
        yield braid
    except BaseException:
        braid.__exit__(*sys.exc_info())
        raise
    else:
        braid.__exit__(None, None, None)
    finally:
        os.chmod(world.workdir, mode)


def start_flood(world: World, kind: str, where: str, role: str | None = None):
    argv = [sys.executable, "-c", FLOODER, kind, where, str(FLOOD)]
    if role is not None:
        argv = ["ip", "netns", "exec", world.ns(role), *argv]
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env()
    )
    line = proc.stdout.readline()
    assert line, "the flooder printed nothing"
    return proc, json.loads(line)


def stop_flood(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def timed_status(stack: BraidStack) -> float:
    started = time.monotonic()
    with ControlClient(str(stack.control_path), timeout=5) as client:
        assert client.call("status")["state"]
    return time.monotonic() - started


def test_braidd_raised_its_open_files_limit(stack: BraidStack) -> None:
    soft, hard = open_files_limit(stack.daemon.pid)
    assert soft == hard, (soft, hard)


def test_a_control_socket_flood_leaves_root_its_status(world: World, stack: BraidStack) -> None:
    pid = stack.daemon.pid
    time.sleep(0.5)
    before = descriptors(pid)
    log_before = stack.daemon_log.stat().st_size
    flood, opened = start_flood(world, "unix", str(stack.control_path))
    try:
        time.sleep(1.0)
        during = descriptors(pid)
        latency = timed_status(stack)
        cli_started = time.monotonic()
        cli = subprocess.run(
            [sys.executable, "-m", "braid.cli", "--control", str(stack.control_path), "status"],
            capture_output=True,
            text=True,
            timeout=30,
            env=child_env(),
            check=False,
        )
        cli_seconds = time.monotonic() - cli_started
    finally:
        stop_flood(flood)
    after = wait_for(lambda: (n := descriptors(pid)) <= before + 2 and n, 10) or descriptors(pid)
    log_growth = stack.daemon_log.stat().st_size - log_before
    print(
        f"\ncontrol flood of {FLOOD} idle connections as uid {NOBODY} ({opened}): braidd "
        f"descriptors before {before}, during {during}, after {after}; root status request "
        f"{latency * 1000:.0f} ms, `braid status` command {cli_seconds * 1000:.0f} ms; "
        f"log grew {log_growth} bytes"
    )
    assert cli.returncode == 0 and "Braid:" in cli.stdout, cli.stderr
    assert during <= before + 24, (before, during)  # 16 for the user, a few in passing
    assert latency < 1.0
    assert after <= before + 2, (before, after)
    assert log_growth < 16 << 10, stack.daemon_log.read_text()[-4000:]


def test_a_socks_flood_leaves_root_its_flows(world: World, stack: BraidStack) -> None:
    pid = stack.daemon.pid
    socks = f"{stack.socks[0]}:{stack.socks[1]}"
    before = descriptors(pid)
    log_before = stack.daemon_log.stat().st_size
    ours = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, open_files_limit(pid))
        per_user = limits.socks_caps().per_user  # as braidd computed it
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, ours)
    flood, opened = start_flood(world, "tcp", socks, role="laptop")
    try:
        # braidd accepts them at its own pace; the first are closed after the SOCKS5 handshake
        # timeout (10 s) and the cap then admits more: watch the highest count until the refusal.
        highest = [descriptors(pid)]

        def refused() -> bool:
            highest.append(descriptors(pid))
            log = stack.daemon_log.read_bytes()[log_before:]
            return f"refused a connection of uid {NOBODY}".encode() in log

        wait_for(refused, 8)
        time.sleep(0.5)
        # asyncio accepts up to the backlog (512) before the cap is asked: a passing peak.
        peak, during = max(highest), descriptors(pid)
        result = run_traffic(
            world, "download", world.target_v4, "--bytes", "200K", "--socks", socks
        )
    finally:
        stop_flood(flood)
    after = wait_for(lambda: (n := descriptors(pid)) <= before + 8 and n, 20) or descriptors(pid)
    log = stack.daemon_log.read_bytes()[log_before:].decode(errors="replace")
    print(
        f"\nSOCKS5 flood of {FLOOD} connections as uid {NOBODY} ({opened}), at most {per_user} "
        f"per user: braidd descriptors before {before}, during {during} (at the peak {peak}), "
        f"after {after}; a root "
        f"download meanwhile: {result.get('ok')}; log grew {len(log)} bytes"
    )
    assert result["ok"] and result["sha256"] == result["expected_sha256"], result
    assert during <= before + per_user + 24, (before, during)
    assert peak <= before + per_user + 512 + 24, (before, peak)
    assert f"refused a connection of uid {NOBODY}" in log
    assert after <= before + 8, (before, after)
    assert len(log) < 16 << 10, log[-4000:]
