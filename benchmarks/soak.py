"""Soak: Braid under steady traffic, a call, link flaps and connection churn for a long while.

Runs the real braid-server, braidd and tray (offscreen) in the namespace world and samples, every
few seconds, the open file descriptors and resident memory of each, and counts errors (failed or
corrupted transfers, ERROR lines in the logs). Target: no errors, and no growth of descriptors or
memory after warm-up (under 10 %).

    ./dev bench soak [--minutes 10] [--png benchmarks/out/soak.png]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from braid.netbed import World, unavailable_reason
from braid.netbed.stack import BraidStack, run_load, run_traffic
from common import links_for

SAMPLE_EVERY = 5.0
FLAP_EVERY = 15.0


class Soak:
    def __init__(self, world: World, stack: BraidStack, seconds: float) -> None:
        self.world = world
        self.stack = stack
        self.deadline = time.monotonic() + seconds
        self.transfers = 0
        self.failures: list[str] = []
        self.flaps = 0
        self.churn_rounds = 0
        self.call_sent = 0
        self.call_received = 0
        self.rng = random.Random(11)

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    def steady(self) -> None:
        n = 0
        while self.running():
            result = run_traffic(
                self.world,
                "download",
                self.world.target_v4,
                "--bytes",
                str(8 << 20),
                "--seed",
                f"soak-{n}",
                "--socks",
                "127.0.0.1:1080",
                "--timeout",
                "30",
                timeout=120,
            )
            n += 1
            self.transfers += 1
            if not result.get("ok") or result.get("sha256") != result.get("expected_sha256"):
                self.failures.append(f"steady download {n}: {result.get('error')}")

    def churn(self) -> None:
        while self.running():
            report = run_load(
                self.world,
                "127.0.0.1:1080",
                50,
                max_bytes=100_000,
                timeout=60,
                seed=self.churn_rounds,
            )
            self.churn_rounds += 1
            if "error" in report:
                self.failures.append(f"churn round {self.churn_rounds}: {report['error']}")
                continue
            self.transfers += report["ok"]
            if report["failed"]:
                self.failures.append(f"churn round {self.churn_rounds}: {report['errors'][:3]}")
            time.sleep(5)

    def call(self) -> None:
        """A steady call (50 datagrams of 160 bytes a second, echoed) through SOCKS5 UDP, in
        10 s pieces: the datagram path, redundant on two links, across the flaps."""
        while self.running():
            result = run_traffic(
                self.world,
                "echo",
                self.world.target_v4,
                "--count",
                "500",
                "--interval",
                "0.02",
                "--size",
                "160",
                "--timeout",
                "2",
                "--socks",
                "127.0.0.1:1080",
                timeout=60,
            )
            sent, received = result.get("sent", 0), len(result.get("rtts_ms", []))
            self.call_sent += sent
            self.call_received += received
            if sent == 0 or received < 0.98 * sent:
                self.failures.append(f"call: {received} of {sent} datagrams answered")

    def flapper(self) -> None:
        names = [spec.name for spec in self.world.links]
        while self.running():
            time.sleep(FLAP_EVERY)
            if not self.running():
                break
            name = self.rng.choice(names)
            if self.rng.random() < 0.5:
                self.world.blackhole(name)
                time.sleep(3)
                self.world.restore(name)
            else:
                self.world.link_down(name)
                time.sleep(3)
                self.world.link_up(name)
            self.flaps += 1


def measure(pids: dict[str, int]) -> dict[str, tuple[int, int]]:
    out = {}
    for name, pid in pids.items():
        try:
            proc = psutil.Process(pid)
            out[name] = (proc.num_fds(), proc.memory_info().rss)
        except psutil.Error:
            out[name] = (0, 0)
    return out


def start_tray(stack: BraidStack) -> subprocess.Popen:
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "braid.gui.app",
            "--control",
            str(stack.control_path),
            "--show",
            "dashboard",
            "--instance",
            "braid-soak-tray",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def growth(series: list[int], warmup: int) -> float:
    """Relative growth of the floor after warm-up: the lowest sample of the last quarter against
    the lowest of the first. A leak raises the floor; the churn's spikes (a hundred connections
    in flight at the moment of a sample) never touch it, while a median of a short run's few
    samples took one spike for half the level."""
    after = series[warmup:]
    if len(after) < 4:
        return 0.0
    quarter = max(1, len(after) // 4)
    first = min(after[:quarter])
    last = min(after[-quarter:])
    return 0.0 if first == 0 else (last - first) / first


def run(seconds: float, png: Path | None, out_json: Path | None, with_tray: bool = True) -> dict:
    with World(links_for((10, 20, 30), (60, 40, 30))) as world:
        stack = BraidStack(world).start()
        tray = start_tray(stack) if with_tray else None
        try:
            time.sleep(2)
            pids = {"braidd": stack.daemon.pid, "braid-server": stack.server.pid}
            if tray is not None:
                pids["tray"] = tray.pid
            soak = Soak(world, stack, seconds)
            threads = [
                threading.Thread(target=fn, daemon=True)
                for fn in (soak.steady, soak.churn, soak.call, soak.flapper)
            ]
            for thread in threads:
                thread.start()
            samples: list[tuple[float, dict]] = []
            every = max(1.0, min(SAMPLE_EVERY, seconds / 30))  # a short run: 30 samples
            started = time.monotonic()
            while soak.running():
                samples.append((time.monotonic() - started, measure(pids)))
                time.sleep(every)
            for thread in threads:
                thread.join(timeout=180)
            samples.append((time.monotonic() - started, measure(pids)))
            errors_in_logs = [
                line
                for path in (stack.daemon_log, stack.server_log)
                for line in path.read_text(errors="replace").splitlines()
                if " ERROR " in line
            ]
        finally:
            if tray is not None:
                tray.terminate()
                tray.wait(10)
            stack.stop()
    warmup = max(1, len(samples) // 5)
    report: dict = {
        "seconds": seconds,
        "transfers": soak.transfers,
        "flaps": soak.flaps,
        "churn_rounds": soak.churn_rounds,
        "call_sent": soak.call_sent,
        "call_received": soak.call_received,
        "failures": soak.failures,
        "errors_in_logs": errors_in_logs[:20],
        "processes": {},
    }
    for name in pids:
        fds = [s[1][name][0] for s in samples]
        rss = [s[1][name][1] for s in samples]
        report["processes"][name] = {
            "fds_start": fds[warmup],
            "fds_end": fds[-1],
            "fds_growth": round(growth(fds, warmup), 3),
            "rss_mb_start": round(rss[warmup] / 1e6, 1),
            "rss_mb_end": round(rss[-1] / 1e6, 1),
            "rss_growth": round(growth(rss, warmup), 3),
        }
    report["samples"] = [
        {"t": round(t, 1), **{k: {"fds": v[0], "rss": v[1]} for k, v in m.items()}}
        for t, m in samples
    ]
    if out_json:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(report, indent=2))
    if png:
        draw(report, png)
    return report


def draw(report: dict, png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    times = [s["t"] for s in report["samples"]]
    for name in report["processes"]:
        ax1.plot(times, [s[name]["fds"] for s in report["samples"]], label=name)
        ax2.plot(times, [s[name]["rss"] / 1e6 for s in report["samples"]], label=name)
    ax1.set_ylabel("open descriptors")
    ax2.set_ylabel("resident memory, MB")
    ax2.set_xlabel("seconds")
    ax1.legend()
    ax1.set_title(f"Soak: {report['transfers']} transfers, {report['flaps']} link flaps")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--png", type=Path, default=Path("benchmarks/out/soak.png"))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/out/soak.json"))
    parser.add_argument("--no-tray", action="store_true")
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 1
    report = run(args.minutes * 60, args.png, args.json, with_tray=not args.no_tray)
    print(
        f"{report['seconds']:.0f} s: {report['transfers']} transfers intact or not, "
        f"{report['flaps']} flaps, {report['churn_rounds']} churn rounds"
    )
    print(
        f"failures: {len(report['failures'])}; ERROR lines in logs: {len(report['errors_in_logs'])}"
    )
    print(f"{'process':<14}{'fds':>12}{'growth':>9}{'RSS MB':>16}{'growth':>9}")
    for name, p in report["processes"].items():
        print(
            f"{name:<14}{p['fds_start']:>5} → {p['fds_end']:<5}{p['fds_growth']:>8.1%}"
            f"{p['rss_mb_start']:>7} → {p['rss_mb_end']:<6}{p['rss_growth']:>8.1%}"
        )
    print(f"call: {report['call_received']} of {report['call_sent']} datagrams answered")
    for failure in report["failures"][:5]:
        print("  !", failure)
    print(f"plot: {args.png}")
    return 0 if not report["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
