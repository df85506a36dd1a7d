"""Real-time UDP: a call-like stream, side by side in one run, on the same emulated links.

A call is 50 datagrams a second of 160 bytes, echoed by the target, sent by an unmodified
application in system-wide mode. Contenders: direct over the best link (the call leaves by eth0,
outside Braid), Braid's tunnel path (udp_realtime = tunnel: frames inside an MPTCP tunnel
connection, as before the datagram path), and the datagram path without (fastest) and with
(redundant) redundancy. Situations: idle; during a bulk download through Braid (the call's
datagrams from its first one, as a plain UDP stream starts); the same with a WebRTC call's start
(0.3 s of connectivity checks, STUN binding requests 50 ms apart as ICE sends them, on the
call's own addresses before its media; only the media is timed); the link that carries the call
blackholed at its ISP for 4 s; the same link's interface down for 4 s.

For each it prints p50/p99 round trip, the share of datagrams later than 150 ms or lost, the
worst gap between answers (anywhere in the call, and while the link was cut or coming back), the
bulk download's goodput during the call, and draws every datagram's round trip to a PNG.

    ./dev bench realtime [--png benchmarks/out/realtime.png] [--seconds 10] [--only bulk ...]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from braid.netbed import World, unavailable_reason
from braid.netbed.stack import BraidStack, start_traffic, wait_for
from common import links_for

RATES = (20, 12, 6)
RTTS = (10, 40, 100)
INTERVAL = 0.02
SIZE = 160
LATE_MS = 150.0
CUT_AT, CUT_FOR = 3.0, 4.0
OWN_MARK = 0x1B000001  # braidd's own mark, which the capture lets pass: "direct" borrows it
CONTENDERS = ("direct, best link", "Braid tunnel", "datagram, fastest", "datagram, redundant")
MODE = {
    "Braid tunnel": "tunnel",
    "datagram, fastest": "fastest",
    "datagram, redundant": "redundant",
}
SITUATIONS = (
    "idle",
    "bulk download",
    "bulk download, WebRTC start",
    "link blackholed 4 s",
    "link down 4 s",
)
ONLY = dict(zip(SITUATIONS, ("idle", "bulk", "webrtc", "blackhole", "down"), strict=True))
#: A WebRTC call's start: connectivity checks (STUN binding requests) on the call's own addresses,
#: paced 50 ms apart as ICE does, before its media.
ICE_SECONDS, ICE_INTERVAL = 0.3, 0.05


# --- the call client (runs in the laptop's namespace) -------------------------------------------


def stun_check() -> bytes:
    """A STUN binding request (RFC 5389) with a fresh transaction id, as in an ICE check."""
    return b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12)


def call(
    host: str,
    port: int,
    seconds: float,
    device: str | None,
    bind: str | None,
    mark: bool,
    ice: float = 0.0,
):
    """Send a call-like stream and time each echo: a JSON line of send offsets and RTTs. With
    ``ice``, connectivity checks go first for that long (not timed): a WebRTC call's start."""
    count = int(seconds / INTERVAL)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    token = os.urandom(8)
    header = struct.Struct("!8sI")
    padding = bytes(SIZE - header.size)
    sent_at: list[float] = []
    rtts: list[float | None] = [None] * count
    arrivals: list[float] = []
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        if mark:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, OWN_MARK)
        if device:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        if bind:
            sock.bind((bind, 0))
        sock.setblocking(False)
        print(json.dumps({"started": True}), flush=True)  # the harness times its cuts from here
        for _ in range(round(ice / ICE_INTERVAL)):
            with contextlib.suppress(OSError):
                sock.sendto(stun_check(), (host, port))
            time.sleep(ICE_INTERVAL)
        with contextlib.suppress(BlockingIOError, InterruptedError, OSError):
            while sock.recv(65535):  # the checks' answers
                pass
        start = time.monotonic()
        deadline = start + count * INTERVAL + 1.0
        while True:
            now = time.monotonic()
            seq = len(sent_at)
            if seq < count and now >= start + seq * INTERVAL:
                sent_at.append(now - start)
                with contextlib.suppress(OSError):
                    sock.sendto(header.pack(token, seq) + padding, (host, port))
                continue
            if now >= deadline:
                break
            wake = start + seq * INTERVAL if seq < count else deadline
            readable, _, _ = select.select([sock], [], [], max(0.0, min(wake, deadline) - now))
            while readable:
                try:
                    data = sock.recv(65535)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    continue
                arrived = time.monotonic() - start
                if len(data) >= header.size:
                    got, n = header.unpack_from(data)
                    if got == token and n < len(sent_at) and rtts[n] is None:
                        rtts[n] = round((arrived - sent_at[n]) * 1e3, 3)
                        arrivals.append(arrived)
    print(json.dumps({"sent_at": sent_at, "rtts_ms": rtts, "arrivals": arrivals}))


# --- measuring -----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarise(result: dict, seconds: float, fault: bool = False) -> dict:
    """The figures of one call; with ``fault``, also the worst gap while the link was cut or
    coming back (from CUT_AT to a second after CUT_AT + CUT_FOR, the call's own time)."""
    rtts = [r for r in result["rtts_ms"] if r is not None]
    total = len(result["rtts_ms"])
    late = sum(1 for r in result["rtts_ms"] if r is None or r > LATE_MS)
    # Between consecutive answers, from the first datagram to the first answer, and from the
    # last answer to the call's end.
    marks = sorted([0.0, *result["arrivals"], seconds])
    pairs = list(itertools.pairwise(marks))
    gap = max(b - a for a, b in pairs) * 1e3
    out = {
        "p50": percentile(rtts, 0.5),
        "p99": percentile(rtts, 0.99),
        "late": late / total if total else 1.0,
        "lost": total - len(rtts),
        "gap": gap,
        "fault_gap": None,
    }
    if fault:
        start, end = CUT_AT, CUT_AT + CUT_FOR + 1.0
        out["fault_gap"] = max((b - a for a, b in pairs if b > start and a < end), default=0) * 1e3
    return out


def run_call(world: World, contender: str, seconds: float, ice: float = 0.0) -> subprocess.Popen:
    argv = [sys.executable, str(Path(__file__).resolve()), "--call", world.target_v4]
    argv += ["--seconds", str(seconds), "--ice", str(ice)]
    if contender.startswith("direct"):
        best = world.links[0].name
        argv += ["--device", best, "--bind", world.laptop_addr(best), "--mark"]
    return world.popen("laptop", argv, stdout=subprocess.PIPE, text=True)


def carrying_link(stack: BraidStack, contender: str, world: World) -> str:
    if contender.startswith("datagram"):
        flows = [f for f in stack.status()["datagram"]["flows"] if f["links"]]
        if flows:
            return flows[-1]["links"][0]
    return world.links[0].name  # direct, and the tunnel's flows start on the best link


def start_bulk(world: World, seconds: float):
    """A download through Braid big enough to outlast a call, with progress ticks."""
    size = int((seconds + 10) * sum(RATES) * 1e6 / 8)
    return start_traffic(
        world, "download", world.target_v4, "--bytes", str(size), "--progress",
        "--tick", "0.25", "--timeout", "30",
    )  # fmt: skip


def measure(stack: BraidStack, world: World, contender: str, situation: str, seconds: float):
    if contender in MODE:
        stack.call("set-settings", settings={"udp_realtime": MODE[contender]})
    time.sleep(2.0)  # the previous run's traffic has drained
    bulk = None
    if situation.startswith("bulk download"):
        bulk = start_bulk(world, seconds)
        time.sleep(3.0)  # past slow start, with every link busy
    began = time.time()
    proc = run_call(world, contender, seconds, ICE_SECONDS if "WebRTC" in situation else 0.0)
    assert proc.stdout is not None
    proc.stdout.readline()  # the call has started: cut at CUT_AT of its own time
    cut = None
    if situation.startswith("link"):
        time.sleep(CUT_AT)
        cut = carrying_link(stack, contender, world)
        blackhole = situation == "link blackholed 4 s"
        (world.blackhole if blackhole else world.link_down)(cut)
        time.sleep(CUT_FOR)
        (world.restore if blackhole else world.link_up)(cut)
    out, _ = proc.communicate(timeout=seconds + 30)
    ended = time.time()
    goodput = None
    if bulk is not None:
        bulk.send_signal(signal.SIGTERM)
        text, _ = bulk.communicate(timeout=30)
        ticks = [json.loads(x) for x in text.splitlines() if x.strip().startswith("{")]
        ticks = [(t["t"], t["bytes"]) for t in ticks if "t" in t and began <= t["t"] <= ended]
        if len(ticks) >= 2:
            goodput = (ticks[-1][1] - ticks[0][1]) * 8 / (ticks[-1][0] - ticks[0][0]) / 1e6
    if cut is not None:
        wait_for(lambda: all(link["alive"] for link in stack.status()["links"]), 20)
        time.sleep(2.0)
    result = json.loads(out.strip().splitlines()[-1])
    return result, summarise(result, seconds, fault=cut is not None), goodput, cut


def bulk_alone(world: World, seconds: float) -> float:
    """A bulk download through Braid with no call: the goodput the others are compared with."""
    proc = start_bulk(world, seconds)
    time.sleep(3.0 + seconds)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=30)
    ticks = [json.loads(x) for x in text.splitlines() if x.strip().startswith("{")]
    ticks = [(t["t"], t["bytes"]) for t in ticks if "t" in t]
    ticks = [t for t in ticks if t[0] >= ticks[0][0] + 3.0]
    return (ticks[-1][1] - ticks[0][1]) * 8 / (ticks[-1][0] - ticks[0][0]) / 1e6


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def draw(png: Path, results: dict, seconds: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(results), 1, figsize=(11, 3.2 * len(results)), sharex=True, squeeze=False
    )
    for ax, situation in zip(axes[:, 0], results, strict=True):
        for contender in CONTENDERS:
            raw = results[situation][contender]["raw"]
            xs = [t for t, r in zip(raw["sent_at"], raw["rtts_ms"], strict=True) if r is not None]
            ys = [r for r in raw["rtts_ms"] if r is not None]
            ax.plot(xs, ys, ".", markersize=2, label=contender)
        if situation.startswith("link"):
            ax.axvspan(CUT_AT, CUT_AT + CUT_FOR, color="grey", alpha=0.15)
        ax.set_title(situation)
        ax.set_ylabel("round trip (ms)")
        ax.set_yscale("log")
        ax.set_xlim(0, seconds)
        ax.legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("time into the call (s)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--png", type=Path, default=Path("benchmarks/out/realtime.png"))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--only",
        choices=("idle", "bulk", "webrtc", "blackhole", "down"),
        action="append",
        help="run only these situations (repeatable; default: all)",
    )
    parser.add_argument("--call", help=argparse.SUPPRESS)
    parser.add_argument("--device", help=argparse.SUPPRESS)
    parser.add_argument("--bind", help=argparse.SUPPRESS)
    parser.add_argument("--mark", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ice", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.call:
        call(args.call, 7, args.seconds, args.device, args.bind, args.mark, args.ice)
        return 0
    reason = unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    chosen = [s for s in SITUATIONS if not args.only or ONLY[s] in args.only]
    results: dict = {s: {} for s in chosen}
    started_load = os.getloadavg()[0]
    with World(links_for(RTTS, RATES)) as world, BraidStack(world) as stack:
        stack.call("up", pairing=stack.pairing_uri, mode="system")
        wait_for(lambda: stack.status()["datagram"]["session"], 20)
        wait_for(lambda: all(x["usable"] for x in stack.status()["datagram"]["links"]), 20)
        alone = bulk_alone(world, args.seconds)
        for situation in chosen:
            for contender in CONTENDERS:
                raw, summary, goodput, cut = measure(
                    stack, world, contender, situation, args.seconds
                )
                results[situation][contender] = {
                    **summary,
                    "goodput": goodput,
                    "cut": cut,
                    "raw": raw,
                }
                print(
                    f"{situation}, {contender}: {summary} goodput {fmt(goodput)}", file=sys.stderr
                )
    load = os.getloadavg()[0]
    links = ", ".join(f"{r} Mbit/s {t} ms" for r, t in zip(RATES, RTTS, strict=True))
    print(f"\nA call (50 x {SIZE} B/s, echoed) for {args.seconds:g} s; links {links}.")
    print(f"Bulk download alone through Braid: {alone:.1f} Mbit/s.")
    print(f"Load average (1 min) at the start: {started_load:.1f}, at the end: {load:.1f}.\n")
    print(
        "| situation | contender | p50 ms | p99 ms | late (>150 ms) or lost | lost "
        "| worst gap ms | gap in the fault ms | bulk Mbit/s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for situation in chosen:
        for contender in CONTENDERS:
            r = results[situation][contender]
            print(
                f"| {situation} | {contender} | {fmt(r['p50'])} | {fmt(r['p99'])} | "
                f"{r['late'] * 100:.1f} % | {r['lost']} | {r['gap']:.0f} | "
                f"{fmt(r['fault_gap'], '.0f')} | {fmt(r['goodput'])} |"
            )
    draw(args.png, results, args.seconds)
    args.png.with_suffix(".json").write_text(json.dumps(results))
    print(f"\nper-datagram round trips: {args.png} (raw: {args.png.with_suffix('.json')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
