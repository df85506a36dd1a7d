"""braid-server under a flood of unauthenticated connections from the laptop's own address.

Runs braid-server and braidd in the test world, then for ``--seconds`` (60) throws at the
server, from the address of the laptop's first link: connections held open without a
byte (up to 2000 at once), connect-and-close, garbage and wrong tokens. Twice a second it
samples the server's open descriptors and resident memory; every few seconds a download
through braidd (which opens new tunnels from the same address) must succeed.

    ./dev bench flood [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time

import psutil

from braid.netbed import World, unavailable_reason
from braid.netbed.stack import BraidStack, run_traffic
from common import links_for

KINDS = ("silent:2000", "close:100", "garbage:100", "token:20")


def server_process(stack: BraidStack) -> psutil.Process:
    """braid-server itself (``ip netns exec`` execs it, but look past a wrapper anyway)."""
    assert stack.server is not None
    proc = psutil.Process(stack.server.pid)
    for candidate in [proc, *proc.children(recursive=True)]:
        if any("braid.server" in part for part in candidate.cmdline()):
            return candidate
    return proc


def sample(proc: psutil.Process) -> tuple[int, int]:
    return proc.num_fds(), proc.memory_info().rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (max(soft, min(hard, 16384)), hard)
    )  # the attacker's

    with World(links_for((10, 20, 30), (50, 30, 20))) as world, BraidStack(world) as stack:
        proc = server_process(stack)
        laptop = world.laptop_addr(world.links[0].name)
        idle = [sample(proc) for _ in range(4) if time.sleep(0.25) is None]
        samples: list[tuple[float, int, int]] = []
        downloads: list[tuple[float, bool, float]] = []
        stop = threading.Event()

        def sampler(started: float) -> None:
            while not stop.is_set():
                fds, rss = sample(proc)
                samples.append((time.monotonic() - started, fds, rss))
                stop.wait(0.5)

        def downloader(started: float) -> None:
            while not stop.is_set():
                began = time.monotonic()
                result = run_traffic(
                    world, "download", world.target_v4, "--bytes", str(1 << 20),
                    "--seed", f"flood-{len(downloads)}",
                    "--socks", f"{stack.socks[0]}:{stack.socks[1]}", "--timeout", "20",
                )  # fmt: skip
                ok = bool(result.get("ok") and result["sha256"] == result["expected_sha256"])
                downloads.append((began - started, ok, time.monotonic() - began))
                stop.wait(4)

        started = time.monotonic()
        threads = [
            threading.Thread(target=sampler, args=(started,), daemon=True),
            threading.Thread(target=downloader, args=(started,), daemon=True),
        ]
        for thread in threads:
            thread.start()
        attack = world.popen(
            "laptop",
            [sys.executable, "-m", "braid.netbed.flood", world.server_v4, str(7443), *KINDS,
             "--duration", str(args.seconds), "--local", laptop],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        out, _ = attack.communicate(timeout=args.seconds + 120)
        time.sleep(2)  # what the flood left behind is let go
        after = sample(proc)
        stop.set()
        for thread in threads:
            thread.join(30)

    flood = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    during = [(f, r) for t, f, r in samples if t <= args.seconds]
    base_fds = statistics.median(f for f, _ in idle)
    base_rss = statistics.median(r for _, r in idle)
    print(f"flood of {args.seconds:g} s from {laptop} (the laptop's own address):")
    for row in flood:
        print(
            f"  {row['kind']:<12} {row['attempts']:>8} connections, {row['connected']:>8} "
            f"accepted, {row['dropped_by_server']:>6} held ones dropped by the server"
        )
    print(f"{'braid-server':<14}{'descriptors':>12}{'resident memory':>18}")
    print(f"{'before':<14}{base_fds:>12.0f}{base_rss / 1e6:>15.1f} MB")
    print(
        f"{'flood, peak':<14}{max(f for f, _ in during):>12}"
        f"{max(r for _, r in during) / 1e6:>15.1f} MB"
    )
    print(
        f"{'flood, median':<14}{statistics.median(f for f, _ in during):>12.0f}"
        f"{statistics.median(r for _, r in during) / 1e6:>15.1f} MB"
    )
    print(f"{'2 s after':<14}{after[0]:>12}{after[1] / 1e6:>15.1f} MB")
    good = sum(ok for _, ok, _ in downloads)
    slowest = max((took for _, ok, took in downloads if ok), default=float("nan"))
    print(
        f"downloads of 1 MiB through braidd during the flood: {good} of {len(downloads)} "
        f"intact, slowest {slowest:.2f} s"
    )
    return 0 if downloads and good == len(downloads) else 1


if __name__ == "__main__":
    sys.exit(main())
