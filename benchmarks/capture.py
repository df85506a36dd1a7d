"""System-wide mode: what capturing costs against the SOCKS5 port and against going direct.

Side by side in one run on the same emulated links (50/30/20 Mbit/s):
- goodput of one download by an unmodified client (no proxy settings) with system-wide mode on,
  against the same download through the SOCKS5 port (target: within 5 %), and from a namespace
  NATed behind the laptop (a container: its TCP reaches braidd through TPROXY);
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
from braid.netbed.guest import Guest, nated_guest
from braid.netbed.stack import BraidStack
from braid.netbed.world import python_argv
from common import links_for, traffic

RATES = (50, 30, 20)
RTTS = (20, 20, 20)
MIB = 1 << 20


def download(world: World, n: int, socks: bool) -> dict:
    args = ["download", world.target_v4, "--bytes", str(n), "--timeout", "30"]
    if socks:
        args += ["--socks", "127.0.0.1:1080"]
    return traffic(world, *args)


def forwarded_download(guest: Guest, world: World, n: int) -> dict:
    """The same download from a namespace NATed behind the laptop (a container): TPROXY."""
    done = guest.run(
        [
            *python_argv("braid.netbed.traffic", "download", world.target_v4),
            *("--bytes", str(n), "--timeout", "30"),
        ],
        timeout=300,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {}
    if not result.get("ok"):
        raise RuntimeError(f"forwarded transfer failed: {result.get('error') or done.stderr}")
    return result


def rule_count(world: World) -> int:
    """The rules in Braid's nftables table, as the kernel holds them."""
    done = world.run("laptop", ["nft", "-j", "list", "table", "inet", "braid"])
    return sum(1 for item in json.loads(done.stdout)["nftables"] if "rule" in item)


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
            rules = rule_count(world)
            runs: dict[str, list[float]] = {"system-wide": [], "socks5": [], "forwarded": []}
            with nated_guest(world) as guest:
                for _ in range(args.repeat):
                    runs["system-wide"].append(download(world, n, socks=False)["mbit_per_s"])
                    runs["socks5"].append(download(world, n, socks=True)["mbit_per_s"])
                    runs["forwarded"].append(forwarded_download(guest, world, n)["mbit_per_s"])
            captured = ttfb(world, args.requests)
            stack.call("set-settings", settings={"mode": "proxy"})
            direct = ttfb(world, args.requests)
        finally:
            stack.stop()
    system = statistics.median(runs["system-wide"])
    socks = statistics.median(runs["socks5"])
    forwarded = statistics.median(runs["forwarded"])
    out = {
        "goodput_mbit": {
            "system_wide": system,
            "socks5": socks,
            "forwarded": forwarded,
            "runs": runs,
        },
        "ratio": round(system / socks, 3),
        "rules": rules,
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
    print(
        f"  forwarded (a NATed container):   {forwarded:6.1f} Mbit/s   ratio {forwarded / socks:.3f}"
    )
    print(f"  rules in Braid's nftables table: {rules}")
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
