"""Bulk transfers both ways: how much of the links' summed rate one transfer gets right after
Braid starts, on the next transfers, and after the tunnels sat idle.

Side by side in one world per scenario (braidd's per-link tables, rules and MPTCP endpoints are
in place for all contenders):

- "best link": direct, bound to the best link's address and device (half the size, as in
  aggregate.py: it is the slowest);
- "reference": shadowsocks-libev with --mptcp (stateless per flow);
- "braid": braidd's SOCKS5 port.

For each direction (upload: POST /upload; download: GET /bytes) the kernel's TCP metrics cache is
flushed in every namespace (no contender inherits the previous direction's ssthresh), braidd is
restarted (stop, start, up, wait until it reports "connected"), and then:

1. braid: transfer #1 at once ("start #1": right after the daemon connected), #2 and #3 back to
   back; then the reference's #1-#3, then the best link's #1-#3;
2. each contender's "after idle" transfer starts exactly --idle seconds after its own #3 ended
   (the others' transfers run meanwhile, on the same links but not on its connections; the
   idle time actually waited is in the JSON and never less than --idle).

Efficiency = goodput (bytes over the whole transfer, connection set-up included) / the sum of the
link rates. Links 20/12/6 Mbit/s (sum 38); scenarios: unequal delays 10/40/100 ms and equal
delays 30/30/30 ms.

    ./dev bench upload [--size-mib 24] [--idle 60] [--scenario unequal|equal|both]
    ./dev bench upload --quick      # 8 MiB, 20 s idle, unequal delays only

Writes benchmarks/out/upload.json and benchmarks/out/upload.png. Needs root (network
namespaces) and Debian's shadowsocks-libev.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from braid.netbed import World
from braid.netbed.stack import BraidStack, run_traffic, wait_for
from common import Reference, links_for, side_by_side_possible, via_args

RATES = (20, 12, 6)
SCENARIOS = {
    "unequal": ("unequal delays (10/40/100 ms)", (10, 40, 100)),
    "equal": ("equal delays (30/30/30 ms)", (30, 30, 30)),
}
CONTENDERS = ("braid", "reference", "best link")
DIRECTIONS = ("upload", "download")
PHASES = ("start #1", "#2", "#3", "after idle")
MIB = 1 << 20


def flush_tcp_metrics(world: World) -> None:
    for role in ("laptop", "server", "inet"):
        world.run(role, ["ip", "tcp_metrics", "flush", "all"], check=False)


def restart_braid(stack: BraidStack) -> float:
    """Stop braidd, start it, pair it; seconds until it reported "connected"."""
    stack.stop_daemon()
    began = time.monotonic()
    stack.start_daemon()
    stack.up()
    if not wait_for(lambda: stack.status()["state"] == "connected", 30, 0.05):
        raise RuntimeError(f"braidd did not connect after its restart: {stack.status()}")
    return round(time.monotonic() - began, 2)


def transfer(world: World, direction: str, n: int, via: str) -> dict:
    """One transfer; its goodput, efficiency, duration, share per link (or its error)."""
    before = {link.name: world.counters(link.name) for link in world.links}
    args = [direction, world.target_v4, "--bytes", str(n), "--timeout", "30"]
    try:
        result = run_traffic(world, *args, *via_args(world, via), timeout=600)
    except Exception as exc:  # the client crashed or hung
        result = {"ok": False, "error": f"client: {exc}"}
    after = {link.name: world.counters(link.name) for link in world.links}
    side = 1 if direction == "upload" else 0  # tx bytes for uploads, rx for downloads
    moved = {name: after[name][side] - before[name][side] for name in after}
    out: dict = {"bytes": n, "share_per_link": {}}
    if not result.get("ok"):
        out["error"] = str(result.get("error"))
        return out
    out["goodput_mbit"] = round(result["mbit_per_s"], 2)
    out["efficiency"] = round(result["mbit_per_s"] / sum(RATES), 3)
    out["seconds"] = round(result["elapsed"], 2)
    out["share_per_link"] = {k: round(v / max(1, sum(moved.values())), 3) for k, v in moved.items()}
    return out


def run_direction(world: World, stack: BraidStack, direction: str, args) -> dict:
    size = args.size_mib * MIB
    flush_tcp_metrics(world)
    connect_s = restart_braid(stack)
    out: dict = {via: [] for via in CONTENDERS}
    ended: dict[str, float] = {}
    for via in CONTENDERS:
        n = size // 2 if via == "best link" else size
        for phase in PHASES[:3]:
            out[via].append({"phase": phase, **transfer(world, direction, n, via)})
            print(f"   {direction} {via} {phase}: {brief(out[via][-1])}", flush=True)
        ended[via] = time.monotonic()
    for via in CONTENDERS:
        n = size // 2 if via == "best link" else size
        wait = ended[via] + args.idle - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        idled = round(time.monotonic() - ended[via], 1)
        out[via].append({"phase": PHASES[3], "idle_s": idled, **transfer(world, direction, n, via)})
        print(f"   {direction} {via} {PHASES[3]} ({idled} s): {brief(out[via][-1])}", flush=True)
    out["braid_connect_s"] = connect_s
    return out


def brief(entry: dict) -> str:
    if "error" in entry:
        return f"FAILED: {entry['error']}"
    share = " ".join(f"{k}={v:.2f}" for k, v in entry["share_per_link"].items())
    return f"{entry['goodput_mbit']:.1f} Mbit/s, efficiency {entry['efficiency']:.2f} ({share})"


def run_scenario(key: str, args) -> dict:
    name, rtts = SCENARIOS[key]
    out: dict = {"name": name, "rtts_ms": list(rtts), "rates_mbit": list(RATES)}
    with World(links_for(rtts, RATES)) as world, BraidStack(world) as stack:
        Reference(world)
        for direction in DIRECTIONS:
            out[direction] = run_direction(world, stack, direction, args)
        tunnel = stack.status()["tunnel"]
        out["braid_flows"] = {k: tunnel[k] for k in ("flows_total", "flows_failed")}
    return out


def print_table(results: dict) -> None:
    print()
    config = results["config"]
    print(
        f"Efficiency (goodput / {sum(RATES)} Mbit/s, links {'/'.join(map(str, RATES))}); "
        f"{config['size_mib']} MiB per transfer (best link: half), idle {config['idle_s']} s."
    )
    columns = [f"{d[:2]} {p}" for d in DIRECTIONS for p in PHASES]
    print(f"{'scenario':<30}{'contender':<11}" + "".join(f"{c:>14}" for c in columns))
    for row in results["scenarios"].values():
        for via in CONTENDERS:
            cells = []
            for direction in DIRECTIONS:
                for entry in row[direction][via]:
                    cells.append("failed" if "error" in entry else f"{entry['efficiency']:.3f}")
            print(f"{row['name']:<30}{via:<11}" + "".join(f"{c:>14}" for c in cells))
        connect = ", ".join(f"{d} {row[d]['braid_connect_s']} s" for d in DIRECTIONS)
        flows = row["braid_flows"]
        print(
            f"{'':<30}braidd connected after its restart in: {connect}; "
            f"flows {flows['flows_total']}, failed {flows['flows_failed']}"
        )


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(results["scenarios"].values())
    fig, axes = plt.subplots(len(scenarios), 1, figsize=(11, 4.2 * len(scenarios)), squeeze=False)
    colors = {"best link": "#888888", "reference": "#4c72b0", "braid": "#dd8452"}
    groups = [(d, i) for d in DIRECTIONS for i in range(len(PHASES))]
    width = 0.8 / len(CONTENDERS)
    for ax, row in zip(axes[:, 0], scenarios, strict=True):
        for k, via in enumerate(CONTENDERS):
            xs = [g + (k - 1) * width for g in range(len(groups))]
            ys = [row[d][via][i].get("efficiency", 0) for d, i in groups]
            ax.bar(xs, ys, width, label=via, color=colors[via])
        ax.set_xticks(range(len(groups)), [f"{d}\n{PHASES[i]}" for d, i in groups])
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"goodput / {sum(RATES)} Mbit/s")
        ax.set_title(f"{row['name']}, links {'/'.join(map(str, RATES))} Mbit/s")
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=24, help="size of a transfer")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds idle before the last")
    parser.add_argument("--scenario", choices=("unequal", "equal", "both"), default="both")
    parser.add_argument(
        "--quick", action="store_true", help="8 MiB, 20 s idle, unequal delays only"
    )
    parser.add_argument("--json", type=Path, default=Path("benchmarks/out/upload.json"))
    parser.add_argument("--plot", type=Path, default=Path("benchmarks/out/upload.png"))
    args = parser.parse_args()
    if args.quick:
        args.size_mib, args.idle, args.scenario = 8, 20.0, "unequal"
    if not side_by_side_possible():
        return 1
    keys = list(SCENARIOS) if args.scenario == "both" else [args.scenario]
    results: dict = {
        "config": {
            "rates_mbit": list(RATES),
            "size_mib": args.size_mib,
            "best_link_size_mib": args.size_mib / 2,
            "idle_s": args.idle,
            "quick": args.quick,
        },
        "scenarios": {},
    }
    for key in keys:
        print(f"== {SCENARIOS[key][0]}", flush=True)
        results["scenarios"][key] = run_scenario(key, args)
    print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    plot(results, args.plot)
    print(f"\nresults written to {args.json} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
