"""Web: how long requests and page loads take through Braid, the reference and the best link.

Side by side in one world per scenario (braidd's per-link tables, rules and MPTCP endpoints are
in place for all contenders), the contenders taking turns sample by sample (the first of each
turn rotates) so that noise hits all of them alike:

- "best link": direct, bound to the best link's address and device (the browser: no proxy, the
  laptop's main-table default route, which is the best link; checked before measuring);
- "reference": shadowsocks-libev with --mptcp, SOCKS5 port 1090;
- "braid": braidd's SOCKS5 port 1080.

Scenarios: links 20/12/6 Mbit/s with unequal delays (RTT 10/40/100 ms, the fastest link the
shortest) and with equal delays (30/30/30 ms); and four links of 20/12/6/6 Mbit/s (RTT
10/40/70/100 ms), the world in which the slowness was first measured. Measured:

a. fresh requests: a new TCP connection each (through the SOCKS5 port, or direct), GET of 1, 8,
   30, 120, 500 KiB and 4 MiB; the time from before the connect to the last byte, median and p90
   of --samples per size and contender, 0.2 s apart (braid's warm pool refills between them as
   between a user's clicks);
b. many objects: 6 persistent HTTP/1.1 connections opened at once fetch 60 objects between them
   (sizes cycling 8, 30, 120 KiB: small images, scripts and style sheets, 3.1 MiB in all), as a
   browser does with one site; the wall time until the last byte, median of --rounds;
b2. after a pause: --idle-rounds times, nothing for --idle seconds (a user reading a page),
   then each contender in turn fetches 30, 120 and 500 KiB (GET) and sends 500 KiB (POST), one
   after another (Braid's four flows take pooled tunnels that waited at least the whole pause);
   median of the rounds;
c. a real browser: headless Chromium, a fresh profile per load, loads a page of 60 scripts of
   70 KiB (4.3 MB) from the target with a cache-busting query; the navigation entry's
   loadEventEnd - startTime, median of --loads. Skipped, with a line saying why, without
   chromium, chromium-driver or selenium.

    ./dev bench web [--scenario unequal|equal|four|all ...] [--samples 9] [--rounds 5] [--loads 5]
                    [--idle 15] [--idle-rounds 3]

Writes benchmarks/out/web.json and benchmarks/out/web.png. Needs root (network namespaces) and
Debian's shadowsocks-libev.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
import uuid
from pathlib import Path

from braid.netbed import World, python_argv
from braid.netbed import browser as browser_mod
from braid.netbed.stack import BraidStack, run_traffic, wait_for
from common import SS_SOCKS, Reference, links_for, side_by_side_possible, via_args

RATES = (20, 12, 6)
#: key: (name, round trips, rates). "four" is the world in which the slowness was first measured:
#: four links adding up to 2.2 times the best one.
SCENARIOS = {
    "unequal": ("unequal delays (10/40/100 ms)", (10, 40, 100), RATES),
    "equal": ("equal delays (30/30/30 ms)", (30, 30, 30), RATES),
    "four": ("four links (10/40/70/100 ms)", (10, 40, 70, 100), (20, 12, 6, 6)),
}
CONTENDERS = ("best link", "reference", "braid")
KIB = 1 << 10
SIZES = (1 * KIB, 8 * KIB, 30 * KIB, 120 * KIB, 500 * KIB, 4096 * KIB)
MANY_SIZES = (8 * KIB, 30 * KIB, 120 * KIB)
#: After a pause: (command, size), in order.
AFTER_IDLE = (
    ("download", 30 * KIB),
    ("download", 120 * KIB),
    ("download", 500 * KIB),
    ("upload", 500 * KIB),
)
MANY_OBJECTS = 60
MANY_CONNECTIONS = 6
PAGE_SCRIPTS = 60
PAGE_SCRIPT_SIZE = 70 * KIB
PROXIES = {"braid": "socks5://127.0.0.1:1080", "reference": f"socks5://127.0.0.1:{SS_SOCKS}"}


def size_label(n: int) -> str:
    return f"{n // (1 << 20)} MiB" if n >= 1 << 20 else f"{n // KIB} KiB"


def turns(i: int) -> list[str]:
    """The contenders in sample i's order: the first rotates."""
    k = i % len(CONTENDERS)
    return list(CONTENDERS[k:] + CONTENDERS[:k])


def summary(samples: list[float], failures: list[str]) -> dict:
    out: dict = {"samples_ms": samples, "failures": len(failures)}
    if failures:
        out["errors"] = sorted(set(failures))[:5]
    if samples:
        ordered = sorted(samples)
        out["median_ms"] = round(statistics.median(ordered), 1)
        out["p90_ms"] = round(ordered[math.ceil(0.9 * len(ordered)) - 1], 1)
    return out


def request_once(
    world: World, n: int, via: str, command: str = "download"
) -> tuple[float | None, str | None]:
    """One fresh GET (or POST: ``upload``) of n bytes; (whole time in ms, None) or (None,
    error)."""
    args = [command, world.target_v4, "--bytes", str(n), "--timeout", "30"]
    try:
        result = run_traffic(world, *args, *via_args(world, via), timeout=120)
    except Exception as exc:  # the client crashed or hung: a failed sample
        return None, f"client: {exc}"
    if not result.get("ok"):
        return None, str(result.get("error"))
    # elapsed runs from before the connect (and the SOCKS5 handshake) to the last byte.
    return round(result["elapsed"] * 1000, 1), None


def measure_requests(world: World, samples: int, pause: float) -> dict:
    times = {size: {via: [] for via in CONTENDERS} for size in SIZES}
    errors: dict = {size: {via: [] for via in CONTENDERS} for size in SIZES}
    for i in range(samples):
        for size in SIZES:
            for via in turns(i):
                took, error = request_once(world, size, via)
                if error is None:
                    times[size][via].append(took)
                else:
                    errors[size][via].append(error)
                time.sleep(pause)
        print(f"   requests: sample {i + 1}/{samples} done", flush=True)
    return {
        size_label(size): {via: summary(times[size][via], errors[size][via]) for via in CONTENDERS}
        for size in SIZES
    }


def idle_label(command: str, n: int) -> str:
    return f"{'GET' if command == 'download' else 'POST'} {size_label(n)}"


def measure_after_idle(world: World, rounds: int, idle: float) -> dict:
    times = {key: {via: [] for via in CONTENDERS} for key in AFTER_IDLE}
    errors: dict = {key: {via: [] for via in CONTENDERS} for key in AFTER_IDLE}
    for i in range(rounds):
        time.sleep(idle)
        for via in turns(i):
            for command, size in AFTER_IDLE:
                took, error = request_once(world, size, via, command)
                if error is None:
                    times[(command, size)][via].append(took)
                else:
                    errors[(command, size)][via].append(error)
        print(f"   after {idle:g} s idle: round {i + 1}/{rounds} done", flush=True)
    return {
        idle_label(*key): {via: summary(times[key][via], errors[key][via]) for via in CONTENDERS}
        for key in AFTER_IDLE
    }


def measure_many(world: World, rounds: int, pause: float) -> dict:
    times: dict = {via: [] for via in CONTENDERS}
    errors: dict = {via: [] for via in CONTENDERS}
    args = [
        "fetch-many",
        world.target_v4,
        "--connections",
        str(MANY_CONNECTIONS),
        "--objects",
        str(MANY_OBJECTS),
        "--sizes",
        ",".join(str(n) for n in MANY_SIZES),
        "--timeout",
        "30",
    ]
    for i in range(rounds):
        for via in turns(i):
            try:
                result = run_traffic(
                    world, *args, "--seed", f"r{i}", *via_args(world, via), timeout=180
                )
            except Exception as exc:
                result = {"ok": False, "errors": [f"client: {exc}"]}
            if result.get("ok"):
                times[via].append(round(result["elapsed"] * 1000, 1))
            else:
                errors[via].append("; ".join(result.get("errors") or ["failed"]))
            time.sleep(pause)
    return {via: summary(times[via], errors[via]) for via in CONTENDERS}


def best_link_is_default(world: World) -> str:
    """The laptop's route to the target without a source address: it must be the best link."""
    route = world.run("laptop", ["ip", "route", "get", world.target_v4]).stdout.split()
    best = world.links[0].name
    device = route[route.index("dev") + 1] if "dev" in route else None
    if device != best:
        raise RuntimeError(f"the laptop's default route is via {device}, not {best}: {route}")
    return " ".join(route)


def measure_browser(world: World, loads: int, pause: float) -> dict:
    times: dict = {via: [] for via in CONTENDERS}
    errors: dict = {via: [] for via in CONTENDERS}
    details: dict = {via: [] for via in CONTENDERS}
    route = best_link_is_default(world)
    run_id = uuid.uuid4().hex[:8]
    for i in range(loads):
        for via in turns(i):
            tag = f"{run_id}-{via.replace(' ', '-')}-{i}"
            url = f"http://{world.target_v4}/page/{PAGE_SCRIPTS}?size={PAGE_SCRIPT_SIZE}&v={tag}"
            argv = python_argv("braid.netbed.browser", url, "--timeout", "90")
            if via in PROXIES:
                argv += ["--proxy", PROXIES[via]]
            done = world.run("laptop", argv, check=False, timeout=180)
            try:
                result = json.loads(done.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                result = {"error": f"the browser driver printed nothing: {done.stderr[-500:]}"}
            if result.get("error") is None and result.get("scripts") != PAGE_SCRIPTS:
                result["error"] = f"only {result.get('scripts')} of {PAGE_SCRIPTS} scripts ran"
            if result.get("error") is None:
                times[via].append(result["load_ms"])
            else:
                errors[via].append(str(result["error"]))
            details[via].append(
                {
                    k: result.get(k)
                    for k in ("load_ms", "dom_content_loaded_ms", "response_start_ms")
                }
            )
            time.sleep(pause)
    out = {via: {**summary(times[via], errors[via]), "loads": details[via]} for via in CONTENDERS}
    out["best_link_route"] = route
    return out


def flow_problems(log: Path) -> dict[str, int]:
    """braidd's log lines about failed flows ("flow to ADDRESS: why"), counted by why."""
    counts: dict[str, int] = {}
    for line in log.read_text(errors="replace").splitlines():
        match = re.search(r"flow to \S+?:? (.*)$", line)
        if match:
            counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts


def run_scenario(key: str, args: argparse.Namespace, browser_skip: str | None) -> dict:
    name, rtts, rates = SCENARIOS[key]
    out: dict = {"name": name, "rtts_ms": list(rtts), "rates_mbit": list(rates)}
    with World(links_for(rtts, rates)) as world, BraidStack(world) as stack:
        Reference(world)
        if not wait_for(lambda: stack.status()["state"] == "connected", 20):
            raise RuntimeError(f"braidd did not connect: {stack.status()}")
        print("   fresh requests", flush=True)
        out["requests"] = measure_requests(world, args.samples, args.pause)
        if args.idle_rounds:
            print(f"   requests after {args.idle:g} s idle", flush=True)
            out["after_idle"] = measure_after_idle(world, args.idle_rounds, args.idle)
        print("   many objects over 6 connections", flush=True)
        out["many"] = measure_many(world, args.rounds, args.pause)
        if browser_skip:
            out["browser"] = {"skipped": browser_skip}
        else:
            print("   browser page loads", flush=True)
            out["browser"] = measure_browser(world, args.loads, args.pause)
        tunnel = stack.status()["tunnel"]
        out["braid_flows"] = {k: tunnel[k] for k in ("flows_total", "flows_failed")}
        out["braid_flows"]["log"] = flow_problems(stack.daemon_log)
    return out


def cell(entry: dict) -> str:
    if "median_ms" not in entry:
        return "failed"
    text = f"{entry['median_ms']:.0f} ({entry['p90_ms']:.0f})"
    return text + (f" {entry['failures']}✗" if entry["failures"] else "")


def ratio(entry: dict, base: dict) -> str:
    if "median_ms" not in entry or "median_ms" not in base or not base["median_ms"]:
        return "-"
    return f"{entry['median_ms'] / base['median_ms']:.2f}"


def print_tables(results: dict) -> None:
    widths = (28, 16, 16, 16, 11, 11)
    header = ("", *CONTENDERS, "ref/direct", "braid/dir.")
    for row in results["scenarios"].values():
        print()
        print(
            f"{row['name']}, links {'/'.join(map(str, row['rates_mbit']))} Mbit/s: "
            "median (p90) ms, ✗ = failed samples"
        )
        print(
            "".join(
                f"{h:>{w}}" if i else f"{h:<{w}}"
                for i, (h, w) in enumerate(zip(header, widths, strict=True))
            )
        )
        lines = [(f"GET {label}", entries) for label, entries in row["requests"].items()]
        idle = results["config"]["idle_s"]
        lines += [
            (f"{label}, {idle:g} s idle", e) for label, e in row.get("after_idle", {}).items()
        ]
        lines.append((f"{MANY_OBJECTS} objects / {MANY_CONNECTIONS} conn", row["many"]))
        if "skipped" not in row["browser"]:
            lines.append((f"browser page {PAGE_SCRIPTS}×70K", row["browser"]))
        for label, entries in lines:
            base = entries["best link"]
            cells = [cell(entries[via]) for via in CONTENDERS]
            cells += [ratio(entries["reference"], base), ratio(entries["braid"], base)]
            print(
                f"{label:<{widths[0]}}"
                + "".join(f"{c:>{w}}" for c, w in zip(cells, widths[1:], strict=True))
            )
        if "skipped" in row["browser"]:
            print(f"browser: skipped: {row['browser']['skipped']}")
        flows = row["braid_flows"]
        print(f"braid flows: {flows['flows_total']} total, {flows['flows_failed']} failed")
        for why, count in flows["log"].items():
            print(f"  braidd log: {count}× flow to ...: {why}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(results["scenarios"].values())
    fig, axes = plt.subplots(len(scenarios), 1, figsize=(15, 4.2 * len(scenarios)), squeeze=False)
    colors = {"best link": "#888888", "reference": "#4c72b0", "braid": "#dd8452"}
    for ax, row in zip(axes[:, 0], scenarios, strict=True):
        groups = [(f"GET\n{label}", entries) for label, entries in row["requests"].items()]
        groups += [
            (label.replace(" ", "\n", 1) + "\nafter idle", entries)
            for label, entries in row.get("after_idle", {}).items()
        ]
        groups.append((f"{MANY_OBJECTS} obj.\n{MANY_CONNECTIONS} conn.", row["many"]))
        if "skipped" not in row["browser"]:
            groups.append(("browser\npage", row["browser"]))
        width = 0.8 / len(CONTENDERS)
        for k, via in enumerate(CONTENDERS):
            xs = [g + (k - 1) * width for g in range(len(groups))]
            ys = [entries[via].get("median_ms", 0) for _, entries in groups]
            ax.bar(xs, ys, width, label=via, color=colors[via])
        ax.set_xticks(range(len(groups)), [label for label, _ in groups])
        ax.set_yscale("log")
        ax.set_ylabel("completion time, ms (median)")
        ax.set_title(f"{row['name']}, links {'/'.join(map(str, row['rates_mbit']))} Mbit/s")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenario", choices=(*SCENARIOS, "all"), action="append", help="repeatable; default all"
    )
    parser.add_argument("--samples", type=int, default=9, help="fresh requests per size")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the many-objects fetch")
    parser.add_argument("--loads", type=int, default=5, help="browser page loads per contender")
    parser.add_argument("--pause", type=float, default=0.2, help="seconds between requests")
    parser.add_argument("--idle", type=float, default=15.0, help="seconds of the pauses")
    parser.add_argument("--idle-rounds", type=int, default=3, help="pauses per contender (0: none)")
    parser.add_argument("--no-browser", action="store_true", help="skip the browser part")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/out/web.json"))
    parser.add_argument("--plot", type=Path, default=Path("benchmarks/out/web.png"))
    args = parser.parse_args()
    if not side_by_side_possible():
        return 1
    browser_skip = "--no-browser" if args.no_browser else browser_mod.unavailable_reason()
    if browser_skip:
        print(f"browser part skipped: {browser_skip}", flush=True)
    chosen = args.scenario or ["all"]
    keys = list(SCENARIOS) if "all" in chosen else list(dict.fromkeys(chosen))
    results: dict = {
        "config": {
            "sizes": [size_label(n) for n in SIZES],
            "samples": args.samples,
            "pause_s": args.pause,
            "idle_s": args.idle,
            "idle_rounds": args.idle_rounds,
            "many": {
                "objects": MANY_OBJECTS,
                "connections": MANY_CONNECTIONS,
                "sizes_kib": [n // KIB for n in MANY_SIZES],
                "rounds": args.rounds,
            },
            "browser": {
                "scripts": PAGE_SCRIPTS,
                "script_bytes": PAGE_SCRIPT_SIZE,
                "loads": args.loads,
                "flags": list(browser_mod.FLAGS),
            },
        },
        "scenarios": {},
    }
    for key in keys:
        print(f"== {SCENARIOS[key][0]}", flush=True)
        results["scenarios"][key] = run_scenario(key, args, browser_skip)
    print_tables(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    plot(results, args.plot)
    print(f"\nresults written to {args.json} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
