"""Shared by the benchmarks: the reference stack and the traffic client in a test world."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

from braid.netbed import LinkSpec, World, unavailable_reason
from braid.netbed.stack import run_traffic

SS_PORT = 8388
SS_SOCKS = 1090
SS_METHOD = "chacha20-ietf-poly1305"
SS_KEY = "benchmark-only-key"
MIB = 1 << 20


def side_by_side_possible() -> bool:
    """Whether the test world and the reference stack can run here; if not, says why."""
    reason = unavailable_reason()
    if reason or shutil.which("ss-server") is None:
        print(
            f"cannot run: {reason or 'ss-server missing (Debian: shadowsocks-libev)'}",
            file=sys.stderr,
        )
        return False
    return True


def links_for(rtts, rates) -> list[LinkSpec]:
    names = (("eth0", "ethernet"), ("wlan0", "wifi"), ("usb0", "cellular"), ("usb1", "cellular"))
    return [
        LinkSpec(name, kind, rate, rtt)
        for (name, kind), rate, rtt in zip(names[: len(rtts)], rates, rtts, strict=True)
    ]


class Reference:
    """shadowsocks-libev with --mptcp, as OverTheBox and OpenMPTCProuter deploy it."""

    def __init__(self, world: World) -> None:
        self.world = world
        common = ["-k", SS_KEY, "-m", SS_METHOD, "--mptcp", "--no-delay"]
        self.server = world.popen(
            "server",
            ["ss-server", "-s", "0.0.0.0", "-p", str(SS_PORT), *common],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.local = world.popen(
            "laptop",
            [
                "ss-local",
                "-s",
                world.server_v4,
                "-p",
                str(SS_PORT),
                "-b",
                "127.0.0.1",
                "-l",
                str(SS_SOCKS),
                *common,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)


def traffic(world: World, *args: str) -> dict:
    result = run_traffic(world, *args, timeout=300)
    if not result.get("ok"):
        raise RuntimeError(f"transfer failed: {result.get('error')}")
    return result


def via_args(world: World, via: str) -> list[str]:
    """The traffic client's options for a contender: "best link" (bound to the first link's
    address and device), "braid" (braidd's SOCKS5 port) or "reference" (ss-local's)."""
    if via == "best link":
        best = world.links[0].name
        return ["--device", best, "--bind", world.laptop_addr(best)]
    if via == "braid":
        return ["--socks", "127.0.0.1:1080"]
    return ["--socks", f"127.0.0.1:{SS_SOCKS}"]


def download(world: World, n: int, via: str) -> dict:
    args = ["download", world.target_v4, "--bytes", str(n), "--timeout", "30"]
    return traffic(world, *args, *via_args(world, via))
