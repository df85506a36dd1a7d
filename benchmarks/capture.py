"""System-wide mode: what capturing costs against the SOCKS5 port and against going direct.

Side by side in one run on the same emulated links (50/30/20 Mbit/s):
- goodput of one download by an unmodified client (no proxy settings) with system-wide mode on,
  against the same download through the SOCKS5 port (target: within 5 %);
- time to first byte of 50 small requests with system-wide mode on, against direct access over
  the best link (Braid switched to proxy-only mode, so nothing is captured).

    ./dev bench capture [--size-mib 64] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from braid.netbed import World, unavailable_reason
from braid.netbed.stack import BraidStack
from common import links_for, traffic

RATES = (50, 30, 20)
RTTS = (20, 20, 20)
MIB = 1 << 20


def download(world: World, n: int, socks: bool) -> dict:
    args = ["download", world.target_v4, "--bytes", str(n), "--timeout", "30"]
    if socks:
        args += ["--socks", "127.0.0.1:1080"]
    return traffic(world, *args)


def ttfb(world: World, count: int) -> list[float]:
    return [download(world, 1024, socks=False)["ttfb"] * 1000 for _ in range(count)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/out/capture.json"))
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 1
    n = args.size_mib * MIB
    out: dict = {}
    with World(links_for(RTTS, RATES)) as world:
        stack = BraidStack(world).start()
        try:
            stack.call("up", pairing=stack.pairing_uri, mode="system")
            runs: dict[str, list[float]] = {"system-wide": [], "socks5": []}
            for _ in range(args.repeat):
                runs["system-wide"].append(download(world, n, socks=False)["mbit_per_s"])
                runs["socks5"].append(download(world, n, socks=True)["mbit_per_s"])
            captured = ttfb(world, args.requests)
            stack.call("set-settings", settings={"mode": "proxy"})
            direct = ttfb(world, args.requests)
        finally:
            stack.stop()
    system = statistics.median(runs["system-wide"])
    socks = statistics.median(runs["socks5"])
    out = {
        "goodput_mbit": {"system_wide": system, "socks5": socks, "runs": runs},
        "ratio": round(system / socks, 3),
        "ttfb_ms": {
            "system_wide": {
                "median": statistics.median(captured),
                "p90": sorted(captured)[int(len(captured) * 0.9) - 1],
            },
            "direct_best_link": {
                "median": statistics.median(direct),
                "p90": sorted(direct)[int(len(direct) * 0.9) - 1],
            },
        },
    }
    print(
        f"Links {'/'.join(map(str, RATES))} Mbit/s, {RTTS[0]} ms round trip each; {args.size_mib} MiB, median of {args.repeat}"
    )
    print(f"  system-wide (unmodified client): {system:6.1f} Mbit/s")
    print(f"  SOCKS5 port:                     {socks:6.1f} Mbit/s   ratio {system / socks:.3f}")
    t = out["ttfb_ms"]
    print(f"Time to first byte, {args.requests} requests of 1 KiB:")
    print(
        f"  system-wide:       median {t['system_wide']['median']:.1f} ms, p90 {t['system_wide']['p90']:.1f} ms"
    )
    print(
        f"  direct, best link: median {t['direct_best_link']['median']:.1f} ms, p90 {t['direct_best_link']['p90']:.1f} ms"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
