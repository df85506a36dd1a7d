"""Failover: goodput in 100 ms bins while the busiest link is cut and later restored.

Side by side in one run, on the same emulated links (50/30/20 Mbit/s) and routing: Braid (health
probes pull a dead link's endpoint at once) and the reference stack, shadowsocks-libev with
--mptcp (the kernel alone notices the loss). Two faults: a silent blackhole at the link's ISP,
and the laptop's interface going down. Prints the longest stall after the cut and after the
return, checks the data (no reset, SHA-256 matches) and draws the curves to a PNG.

    ./dev bench failover [--png benchmarks/out/failover.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

from braid.netbed import World
from braid.netbed.stack import BraidStack, start_traffic
from common import Reference, links_for, side_by_side_possible

RATES = (50, 30, 20)
RTTS = (10, 20, 30)
CUT_AT = 4.0
RESTORE_AT = 9.0
DURATION = 14.0
BIN = 0.1


def run_transfer(world: World, socks: str, fault: str) -> dict:
    """One download with progress ticks; cuts eth0 at CUT_AT and restores it at RESTORE_AT."""
    size = int(DURATION * sum(RATES) * 1e6 / 8)
    proc = start_traffic(
        world,
        "download",
        world.target_v4,
        "--bytes",
        str(size),
        "--socks",
        socks,
        "--progress",
        "--tick",
        str(BIN / 2),
        "--timeout",
        "30",
    )
    cut, back = (
        (world.blackhole, world.restore)
        if fault == "blackhole"
        else (world.link_down, world.link_up)
    )
    times: dict[str, float] = {}

    def act(name: str, fn) -> None:
        times[name] = time.time()
        fn("eth0")

    started = time.time()  # the client's ticks carry wall-clock times
    timers = [
        threading.Timer(CUT_AT, act, args=("cut", cut)),
        threading.Timer(RESTORE_AT, act, args=("restore", back)),
    ]
    for timer in timers:
        timer.start()
    out, _ = proc.communicate(timeout=120)
    for timer in timers:
        timer.join()
    if fault == "down":
        world.link_up("eth0")
    else:
        world.restore("eth0")
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    result = lines[-1]
    ticks = [(m["t"] - started, m["bytes"]) for m in lines[:-1] if "t" in m]
    return {
        "ok": result.get("ok", False),
        "error": result.get("error"),
        "sha_ok": result.get("sha256") == result.get("expected_sha256"),
        "ticks": ticks,
        "cut": times.get("cut", started + CUT_AT) - started,
        "restore": times.get("restore", started + RESTORE_AT) - started,
    }


def bins(ticks: list[tuple[float, int]]) -> list[tuple[float, float]]:
    """Goodput (Mbit/s) per 100 ms bin from cumulative byte ticks."""
    if not ticks:
        return []
    end = ticks[-1][0]
    out = []
    index = 0
    last_bytes = 0
    t = 0.0
    while t < end:
        while index < len(ticks) and ticks[index][0] <= t + BIN:
            index += 1
        now_bytes = ticks[index - 1][1] if index else 0
        out.append((t, (now_bytes - last_bytes) * 8 / BIN / 1e6))
        last_bytes = now_bytes
        t += BIN
    return out


def longest_stall(ticks: list[tuple[float, int]], start: float, end: float) -> float:
    """Longest time in [start, end] during which no byte arrived."""
    longest = 0.0
    last_progress = start
    last_bytes = None
    for t, nbytes in ticks:
        if t < start:
            last_bytes = nbytes
            continue
        if t > end:
            break
        if last_bytes is None or nbytes > last_bytes:
            longest = max(longest, t - last_progress)
            last_progress = t
            last_bytes = nbytes
    return max(longest, 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--png", type=Path, default=Path("benchmarks/out/failover.png"))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/out/failover.json"))
    args = parser.parse_args()
    if not side_by_side_possible():
        return 1
    results: dict = {}
    with World(links_for(RTTS, RATES)) as world:
        stack = BraidStack(world).start()
        Reference(world)
        try:
            time.sleep(1.0)  # let the probes settle
            for fault in ("blackhole", "down"):
                print(f"== {fault}: braid", flush=True)
                results[("braid", fault)] = run_transfer(world, "127.0.0.1:1080", fault)
                time.sleep(2.0)
                # The reference runs with braidd disconnected: same tables, rules and
                # endpoints, but nothing reacts to a dead link but the kernel.
                stack.call("down")
                print(f"== {fault}: reference", flush=True)
                results[("reference", fault)] = run_transfer(world, "127.0.0.1:1090", fault)
                stack.up()
                time.sleep(2.0)
        finally:
            stack.stop()

    print()
    print(
        f"eth0 (50 of {sum(RATES)} Mbit/s) cut at {CUT_AT:.0f} s, restored at {RESTORE_AT:.0f} s; "
        "longest time without a byte:"
    )
    print(f"{'fault':<11}{'contender':<11}{'after cut':>11}{'after return':>14}{'data':>8}")
    summary = {}
    for (who, fault), r in results.items():
        cut_stall = longest_stall(r["ticks"], r["cut"], r["restore"])
        back_stall = longest_stall(r["ticks"], r["restore"], r["restore"] + 4)
        data = "ok" if r["ok"] and r["sha_ok"] else f"FAILED {r['error']}"
        print(f"{fault:<11}{who:<11}{cut_stall:>10.2f}s{back_stall:>13.2f}s{data:>8}")
        summary[f"{who}/{fault}"] = {
            "stall_after_cut_s": round(cut_stall, 3),
            "stall_after_return_s": round(back_stall, 3),
            "ok": r["ok"] and r["sha_ok"],
        }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2))
    draw(results, args.png)
    print(f"\nplot: {args.png}; figures: {args.json}")
    return 0


def draw(results: dict, png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for ax, fault in zip(axes, ("blackhole", "down"), strict=True):
        for who, colour in (("braid", "#1f77b4"), ("reference", "#d62728")):
            r = results[(who, fault)]
            xs, ys = zip(*bins(r["ticks"]), strict=True) if r["ticks"] else ((), ())
            ax.plot(
                xs,
                ys,
                label=who if who == "braid" else "shadowsocks-libev --mptcp",
                color=colour,
                linewidth=1.2,
            )
        r = results[("braid", fault)]
        ax.axvline(r["cut"], color="grey", linestyle="--", linewidth=0.8)
        ax.axvline(r["restore"], color="grey", linestyle=":", linewidth=0.8)
        title = "blackholed at its ISP" if fault == "blackhole" else "interface down"
        ax.set_title(f"eth0 {title} at {CUT_AT:.0f} s, back at {RESTORE_AT:.0f} s")
        ax.set_ylabel("goodput, Mbit/s (100 ms bins)")
        ax.set_ylim(bottom=0)
        ax.legend(loc="lower left")
    axes[-1].set_xlabel("seconds")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
