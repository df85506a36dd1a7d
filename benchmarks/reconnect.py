"""How soon braidd is back after its server restarts.

Stops braid-server for a while, starts it again and measures, from the moment it listens, how long
until braidd reports "connected" and a download through it completes (SHA-256 checked). Outages
longer than the retry back-off show whether braidd waits out its back-off or notices the server
at once (its health probes are answered again).

    ./dev bench reconnect [--outages 3 20 60]
"""

from __future__ import annotations

import argparse
import sys
import time

from braid.netbed import World, unavailable_reason
from braid.netbed.stack import BraidStack, run_traffic
from common import links_for


def outage(world: World, stack: BraidStack, seconds: float) -> dict:
    assert stack.server is not None
    stack.server.terminate()
    stack.server.wait(10)
    time.sleep(seconds)
    stack.start_server()  # returns once the server listens
    listening = time.monotonic()
    while stack.status()["state"] != "connected":
        if time.monotonic() - listening > 120:
            return {"outage_s": seconds, "connected_s": None, "download_ok": False}
        time.sleep(0.02)
    connected = time.monotonic() - listening
    result = run_traffic(
        world,
        "download",
        world.target_v4,
        "--bytes",
        str(1 << 20),
        "--seed",
        f"reconnect-{seconds}",
        "--socks",
        f"{stack.socks[0]}:{stack.socks[1]}",
        "--timeout",
        "20",
    )
    return {
        "outage_s": seconds,
        "connected_s": round(connected, 2),
        "first_download_s": round(time.monotonic() - listening, 2),
        "download_ok": bool(result.get("ok") and result["sha256"] == result["expected_sha256"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outages", type=float, nargs="+", default=[3, 20, 60])
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 1
    rows = []
    with World(links_for((10, 20, 30), (50, 30, 20))) as world, BraidStack(world) as stack:
        for seconds in args.outages:
            rows.append(outage(world, stack, seconds))
    print(f"{'server down':>12}{'connected after':>17}{'first download done':>21}{'intact':>8}")
    for row in rows:
        connected = "never" if row["connected_s"] is None else f"{row['connected_s']:.2f} s"
        done = f"{row['first_download_s']:.2f} s" if "first_download_s" in row else "-"
        print(
            f"{row['outage_s']:>10g} s{connected:>17}{done:>21}{'yes' if row['download_ok'] else 'NO':>8}"
        )
    return 0 if all(row["download_ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
