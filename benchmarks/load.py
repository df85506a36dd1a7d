"""Hundreds of concurrent downloads through Braid and through the reference stack, side by side.

Each round starts N downloads at once (random sizes up to 200 kB, every one checked with SHA-256)
through a SOCKS port, Braid's and the reference stack's in turn, in one test world. Prints, per
round and in total, how many completed intact, how many failed or hung until the client gave up,
how long the round took, and how many tunnels braidd's stall guard freed (see app/braid/stall.py:
the wedge it frees is the kernel's, so the reference stack, which runs over the same kernel MPTCP
without such a guard, shows what happens without it).

    ./dev bench load [--rounds 10] [--connections 500] [--timeout 40] [--no-reference]
"""

from __future__ import annotations

import argparse
import sys

from braid.netbed import World, unavailable_reason
from braid.netbed.stack import BraidStack, run_load
from common import SS_SOCKS, Reference, links_for

FREED = "of out-of-order data in a full receive buffer; buffer raised"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=40, help="a client gives up after (s)")
    parser.add_argument("--no-reference", action="store_true")
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 1
    stacks = {"braid": "127.0.0.1:1080"}
    if not args.no_reference:
        stacks["reference"] = f"127.0.0.1:{SS_SOCKS}"
    totals = {name: {"ok": 0, "failed": 0, "rounds_with_failures": 0} for name in stacks}
    print(f"{'round':>5}{'stack':>11}{'intact':>8}{'failed':>8}{'peak open':>11}{'seconds':>9}")
    with World(links_for((10, 20, 30), (60, 40, 30))) as world:
        stack = BraidStack(world).start()
        try:
            if not args.no_reference:
                Reference(world)
            for i in range(args.rounds):
                for name, socks in stacks.items():
                    report = run_load(
                        world, socks, args.connections, timeout=args.timeout, seed=1000 + i
                    )
                    if "error" in report:
                        print(f"{i + 1:>5}{name:>11}  {report['error']}", flush=True)
                        totals[name]["failed"] += args.connections
                        totals[name]["rounds_with_failures"] += 1
                        continue
                    totals[name]["ok"] += report["ok"]
                    totals[name]["failed"] += report["failed"]
                    totals[name]["rounds_with_failures"] += bool(report["failed"])
                    print(
                        f"{i + 1:>5}{name:>11}{report['ok']:>8}{report['failed']:>8}"
                        f"{report['peak_open']:>11}{report['elapsed']:>9.1f}",
                        flush=True,
                    )
            freed = stack.daemon_log.read_text(errors="replace").count(FREED)
        finally:
            stack.stop()
    print()
    for name, total in totals.items():
        print(
            f"{name}: {total['ok']} of {total['ok'] + total['failed']} downloads intact, "
            f"{total['rounds_with_failures']} of {args.rounds} rounds with a failure"
        )
    print(f"tunnels freed by braidd's stall guard: {freed}")
    return 0 if totals["braid"]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
