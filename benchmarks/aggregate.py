"""Aggregation: how much of the links' summed rate one download gets through Braid.

Side by side in one run, on the same emulated links and the same routing (braidd's
per-link tables, rules and MPTCP endpoints are in place for all of them):

- the best single link alone (a direct download bound to it),
- Braid (SOCKS5 port of braidd, braid-server relaying),
- the reference stack OverTheBox and OpenMPTCProuter run: shadowsocks-libev with --mptcp
  (ss-local on the laptop, ss-server on the server).

Scenarios: equal round trips, and unequal ones (10, 40, 80 ms). Also the time to first byte of
small requests (Braid's warm pool against the reference), and CPU seconds per GB at each end on
unshaped links.

    ./dev bench aggregate [--size-mib 96] [--repeat 2] [--json benchmarks/out/aggregate.json]

Needs root (network namespaces) and Debian's shadowsocks-libev.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import psutil

from braid.netbed import World
from braid.netbed.stack import BraidStack
from common import Reference, download, links_for, side_by_side_possible

RATES = (50, 30, 20)
SCENARIOS = {
    "equal delays (20/20/20 ms)": (20, 20, 20),
    "unequal delays (10/40/80 ms)": (10, 40, 80),
}
MIB = 1 << 20


def link_bytes(world: World) -> dict[str, int]:
    return {link.name: world.counters(link.name)[0] for link in world.links}


def measure_goodput(rtts, size: int, repeat: int) -> dict:
    links = links_for(rtts, RATES)
    total = sum(RATES)
    out: dict = {"rtts_ms": list(rtts), "rates_mbit": list(RATES)}
    with World(links) as world:
        stack = BraidStack(world).start()
        Reference(world)
        try:
            runs: dict[str, list[float]] = {"best link": [], "braid": [], "reference": []}
            spread: dict[str, dict[str, float]] = {}
            for _ in range(repeat):
                for via in runs:
                    before = link_bytes(world)
                    n = size // 2 if via == "best link" else size
                    result = download(world, n, via)
                    after = link_bytes(world)
                    runs[via].append(result["mbit_per_s"])
                    moved = {k: after[k] - before[k] for k in after}
                    spread[via] = {
                        k: round(v / max(1, sum(moved.values())), 3) for k, v in moved.items()
                    }
            for via, values in runs.items():
                goodput = statistics.median(values)
                out[via] = {
                    "goodput_mbit": round(goodput, 1),
                    "efficiency": round(goodput / total, 3),
                    "runs": values,
                    "share_per_link": spread[via],
                }
            out["ttfb_ms"] = {via: measure_ttfb(world, via) for via in ("braid", "reference")}
        finally:
            stack.stop()
    return out


def measure_ttfb(world: World, via: str, count: int = 30) -> dict:
    samples = []
    for _ in range(count):
        result = download(world, 1024, via)
        samples.append(result["ttfb"] * 1000)
        time.sleep(0.05)  # let the pool refill as it would between a user's clicks
    return {
        "median": round(statistics.median(samples), 1),
        "p90": round(sorted(samples)[int(count * 0.9) - 1], 1),
    }


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def measure_cpu(size: int) -> dict:
    links = links_for((0, 0, 0), rates=(None, None, None))
    out: dict = {}
    with World(links) as world:
        stack = BraidStack(world).start()
        reference = Reference(world)
        try:
            ends = {
                "braid": {"laptop": [stack.daemon.pid], "server": [stack.server.pid]},
                "reference": {"laptop": [reference.local.pid], "server": [reference.server.pid]},
            }
            for via, pids in ends.items():
                download(world, 16 * MIB, via)  # warm up
                before = {end: cpu_seconds(p) for end, p in pids.items()}
                result = download(world, size, via)
                after = {end: cpu_seconds(p) for end, p in pids.items()}
                gb = result["bytes"] / 1e9
                out[via] = {
                    f"{end}_cpu_s_per_gb": round((after[end] - before[end]) / gb, 2) for end in pids
                }
                out[via]["goodput_mbit"] = result["mbit_per_s"]
        finally:
            stack.stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size-mib", type=int, default=96, help="download size through the tunnels"
    )
    parser.add_argument("--cpu-size-mib", type=int, default=512, help="download size for CPU cost")
    parser.add_argument("--repeat", type=int, default=2, help="runs per contender (median)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/out/aggregate.json"))
    args = parser.parse_args()
    if not side_by_side_possible():
        return 1
    results: dict = {"scenarios": {}}
    for name, rtts in SCENARIOS.items():
        print(f"== {name}", flush=True)
        results["scenarios"][name] = measure_goodput(rtts, args.size_mib * MIB, args.repeat)
    print("== CPU cost, unshaped links", flush=True)
    results["cpu"] = measure_cpu(args.cpu_size_mib * MIB)

    print()
    print(
        f"Links {'/'.join(map(str, RATES))} Mbit/s (sum {sum(RATES)}); one download each, median of {args.repeat}."
    )
    print(f"{'scenario':<30}{'contender':<12}{'goodput':>10}{'efficiency':>12}   share per link")
    for name, row in results["scenarios"].items():
        for via in ("best link", "braid", "reference"):
            r = row[via]
            share = " ".join(f"{k}={v:.2f}" for k, v in r["share_per_link"].items())
            print(
                f"{name:<30}{via:<12}{r['goodput_mbit']:>8.1f}Mb{r['efficiency']:>12.3f}   {share}"
            )
        t = row["ttfb_ms"]
        print(
            f"{'':<30}time to first byte, 1 KiB: braid {t['braid']['median']} ms (p90 {t['braid']['p90']}), "
            f"reference {t['reference']['median']} ms (p90 {t['reference']['p90']})"
        )
    print()
    print(
        f"{'CPU per GB relayed (unshaped)':<32}{'laptop s/GB':>12}{'server s/GB':>12}{'goodput':>12}"
    )
    for via, r in results["cpu"].items():
        print(
            f"{via:<32}{r['laptop_cpu_s_per_gb']:>12.2f}{r['server_cpu_s_per_gb']:>12.2f}{r['goodput_mbit']:>10.0f}Mb"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
