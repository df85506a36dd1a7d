"""What the tray costs: CPU and memory with the dashboard open and four links streaming.

A fake braidd (the tests' own, speaking the real control protocol on a real Unix socket)
streams a sample a second for four links; the real tray runs as its own process with its
dashboard open, under Xvfb when there is one (else Qt's offscreen platform). After a
warm-up, the tray's CPU time over the run gives its average share of one core, and its
resident memory is sampled every second for the peak.

    python benchmarks/tray.py [--seconds 60] [--links 4]

Targets: under 2 % of one core on average and under 200 MB resident.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "gui"))
from fake_braidd import FakeBraidd

CPU_TARGET = 2.0  # percent of one core
RSS_TARGET = 200 * 1024 * 1024
WARM_UP = 5.0
LINK_NAMES = [("eth0", "ethernet"), ("wlan0", "wifi"), ("usb0", "cellular"), ("wwan0", "cellular")]


def stream(daemon: FakeBraidd, stop: threading.Event) -> None:
    """One sample a second, rates wandering as real links do."""
    step = 0
    while not stop.wait(1.0):
        step += 1
        rates = {}
        for i, link in enumerate(daemon.links):
            wave = 1 + 0.3 * math.sin(step / (5 + i))
            rates[link["name"]] = (40e6 / (i + 1) * wave, 1.5e6 / (i + 1) * wave)
        daemon.push_sample(rates)


def start_display(workdir: Path) -> tuple[dict[str, str], subprocess.Popen | None]:
    """An Xvfb display for the tray when Xvfb is installed; else Qt's offscreen platform."""
    if not shutil.which("Xvfb"):
        return {"QT_QPA_PLATFORM": "offscreen"}, None
    for number in range(90, 120):
        if not Path(f"/tmp/.X11-unix/X{number}").exists():
            break
    xvfb = subprocess.Popen(
        ["Xvfb", f":{number}", "-screen", "0", "1280x900x24", "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not Path(f"/tmp/.X11-unix/X{number}").exists():
        if time.monotonic() > deadline or xvfb.poll() is not None:
            xvfb.kill()
            return {"QT_QPA_PLATFORM": "offscreen"}, None
        time.sleep(0.05)
    return {"QT_QPA_PLATFORM": "xcb", "DISPLAY": f":{number}"}, xvfb


def dump(env: dict[str, str], path: Path) -> dict:
    subprocess.run(
        [sys.executable, "-m", "braid.gui.app", "--dump", str(path)],
        env=env,
        check=True,
        capture_output=True,
        timeout=20,
    )
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="measured time (default 60)")
    parser.add_argument("--links", type=int, default=4, choices=range(1, 5))
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="braid-tray-bench-"))
    daemon = FakeBraidd(workdir / "control.sock", LINK_NAMES[: args.links]).start()
    daemon.state, daemon.server, daemon.connected_since = (
        "connected",
        "203.0.113.7:7443",
        time.time(),
    )
    stop = threading.Event()
    pusher = threading.Thread(target=stream, args=(daemon, stop), daemon=True)
    pusher.start()
    display, xvfb = start_display(workdir)
    env = {
        **os.environ,
        **display,
        "XDG_RUNTIME_DIR": str(workdir),
        "XDG_CONFIG_HOME": str(workdir / "config"),
    }
    tray = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "braid.gui.app",
            "--control",
            str(daemon.path),
            "--show",
            "dashboard",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        process = psutil.Process(tray.pid)
        time.sleep(WARM_UP)  # start-up (imports, first paint) is not the steady cost
        before = dump(env, workdir / "before.json")
        cpu_start = sum(process.cpu_times()[:2])
        wall_start = time.monotonic()
        peak = process.memory_info().rss
        while time.monotonic() - wall_start < args.seconds:
            time.sleep(1.0)
            peak = max(peak, process.memory_info().rss)
        cpu = sum(process.cpu_times()[:2]) - cpu_start
        wall = time.monotonic() - wall_start
        after = dump(env, workdir / "after.json")
    finally:
        tray.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            tray.wait(10)
        if tray.poll() is None:
            tray.kill()
        stop.set()
        daemon.stop()
        if xvfb is not None:
            xvfb.terminate()
            xvfb.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)

    cpu_percent = 100.0 * cpu / wall
    samples = after["samples"] - before["samples"]
    platform = display["QT_QPA_PLATFORM"]
    print(f"Braid tray, dashboard open, {args.links} links streaming at 1 Hz ({platform})")
    print(f"  measured        {wall:6.1f} s, {samples} samples drawn")
    print(f"  dashboard shown {after['dashboard_visible']}")
    print(
        f"  CPU             {cpu_percent:6.2f} % of one core"
        f"   (target < {CPU_TARGET:g} %: {'ok' if cpu_percent < CPU_TARGET else 'OVER'})"
    )
    print(
        f"  peak RSS        {peak / 2**20:6.1f} MB"
        f"   (target < {RSS_TARGET / 2**20:.0f} MB: {'ok' if peak < RSS_TARGET else 'OVER'})"
    )
    ok = cpu_percent < CPU_TARGET and peak < RSS_TARGET and after["dashboard_visible"]
    return 0 if ok and samples >= args.seconds * 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
