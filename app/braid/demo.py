"""``braid demo``: Braid bonding three emulated links, live in the terminal.

Builds the namespace world (a laptop with Ethernet, Wi-Fi and a tethered
phone, an ISP per link, the user's server, the internet), runs the real
braid-server and braidd in it, downloads through Braid and shows each link's
throughput and the total against the best single link once a second. In the
middle it cuts the best link at its ISP and later brings it back. Everything
is removed at the end, on Ctrl-C too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from braid.netbed import DEFAULT_LINKS, World, unavailable_reason
from braid.netbed.stack import BraidStack
from braid.units import format_rate


def _say(text: str = "") -> None:
    print(text, flush=True)


class _Goodput:
    """Reads the traffic client's progress lines: application bytes received so far."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.bytes = 0
        self.result: dict | None = None
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if "direction" in message:
                self.result = message
            elif "bytes" in message:
                self.bytes = message["bytes"]


def run_demo(duration: float = 30.0, size_mib: int = 0) -> int:
    reason = unavailable_reason()
    if reason:
        print(f"braid demo {reason}. Run it as root: sudo ./dev demo", file=sys.stderr)
        return 1
    links = list(DEFAULT_LINKS)
    best = max(link.rate_mbit or 0 for link in links) * 1e6
    _say("Building the emulated world (network namespaces; your own network is not touched):")
    for link in links:
        _say(
            f"  {link.name:<6} {link.kind:<9} {link.rate_mbit:>4g} Mbit/s, {link.rtt_ms:g} ms round trip"
        )
    with World(links) as world:
        stack = BraidStack(world)
        try:
            stack.start()
        except Exception:
            print(stack.logs(), file=sys.stderr)
            raise
        try:
            return _show(world, stack, links, best, duration, size_mib)
        except KeyboardInterrupt:
            _say("\ninterrupted: tearing down")
            return 130
        finally:
            stack.stop()
            _say("Removed the emulated world.")


def _open_tray(stack) -> subprocess.Popen | None:
    """With a display, the real tray and its dashboard show the demo too."""
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return None
    try:
        import braid.gui.app  # noqa: F401 - only checks that the desktop parts are installed
    except ImportError:
        _say("(no tray: PySide6 is not installed)")
        return None
    _say("Opening Braid's tray icon and dashboard on your display.")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "braid.gui.app",
            "--control",
            str(stack.control_path),
            "--show",
            "dashboard",
            # Its own instance: a tray the user already runs must not answer for the demo.
            "--instance",
            "braid-demo-tray",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _show(world, stack, links, best, duration, size_mib) -> int:
    tray = _open_tray(stack)
    try:
        return _run_download(world, stack, links, best, duration, size_mib)
    finally:
        if tray is not None:
            tray.terminate()
            try:
                tray.wait(5)
            except subprocess.TimeoutExpired:
                tray.kill()


def _run_download(world, stack, links, best, duration, size_mib) -> int:
    status = stack.status()
    _say(f"braid-server and braidd are running; Braid is {status['state']}.")
    _say(f"Pairing URI: {stack.pairing_uri[:60]}…")
    n = size_mib * (1 << 20) if size_mib else int(duration * 150e6 / 8)
    proc = world.popen(
        "laptop",
        [
            sys.executable,
            "-m",
            "braid.netbed.traffic",
            "download",
            world.target_name,
            "--bytes",
            str(n),
            "--socks",
            f"{stack.socks[0]}:{stack.socks[1]}",
            "--progress",
            "--tick",
            "0.5",
            "--timeout",
            "30",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    goodput = _Goodput(proc)
    names = [link.name for link in links]
    _say()
    _say(f"Downloading through Braid's SOCKS5 port {stack.socks[0]}:{stack.socks[1]}.")
    _say(
        f"{'time':>5}  " + "".join(f"{name:>14}" for name in names) + f"{'total':>14}  vs best link"
    )
    cut_at, back_at = duration * 0.4, duration * 0.65
    cut_done = back_done = False
    started = time.monotonic()
    last_bytes, last_t = 0, started
    totals: list[float] = []
    while proc.poll() is None and time.monotonic() - started < duration:
        time.sleep(1.0)
        now = time.monotonic()
        elapsed = now - started
        rate = (goodput.bytes - last_bytes) * 8 / (now - last_t)
        last_bytes, last_t = goodput.bytes, now
        by_name = {link["name"]: link for link in stack.status()["links"]}
        cells = "".join(f"{format_rate(by_name[name]['rx_bps']):>14}" for name in names)
        _say(f"{elapsed:>4.0f}s  {cells}{format_rate(rate):>14}  {rate / best:4.2f}×")
        totals.append(rate)
        if not cut_done and elapsed >= cut_at:
            world.blackhole(names[0])
            cut_done = True
            _say(f"  ✂  {names[0]} silently stops forwarding at its ISP — the download goes on")
        elif cut_done and not back_done and elapsed >= back_at:
            world.restore(names[0])
            back_done = True
            _say(f"  ↺  {names[0]} is back")
    if proc.poll() is None:
        proc.terminate()
    proc.wait()
    time.sleep(0.2)
    _say()
    steady = sorted(totals)[len(totals) // 2] if totals else 0.0
    _say(
        f"Median goodput {format_rate(steady)} through Braid, {steady / best:.2f}× the best single "
        f"link ({format_rate(best)}); the link rates add up to "
        f"{format_rate(sum((link.rate_mbit or 0) * 1e6 for link in links))}."
    )
    if goodput.result and goodput.result.get("ok"):
        _say("The download completed and its SHA-256 matched.")
    return 0
