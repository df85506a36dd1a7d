"""The braid command: daemon, up, down, status, demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from braid.client import ControlClient, DaemonUnavailable, default_control_path
from braid.protocol.control import ControlError


def format_rate(bits_per_second: float) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits_per_second >= scale:
            return f"{bits_per_second / scale:.1f} {unit}"
    return f"{bits_per_second:.0f} bit/s"


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{seconds:02d}s"
    return f"{seconds}s"


def render_status(status: dict) -> str:
    lines = []
    state = status["state"]
    server = status.get("server")
    head = f"Braid: {state}"
    if server:
        head += f" — server {server}"
    if status.get("connected_since"):
        head += f", for {format_duration(time.time() - status['connected_since'])}"
    lines.append(head)
    if status.get("error") and state != "connected":
        lines.append(f"  last error: {status['error']}")
    lines.append(f"SOCKS5 proxy: {status['socks']}")
    links = status.get("links") or []
    if links:
        lines.append("")
        lines.append(f"{'LINK':<10}{'KIND':<10}{'PRIORITY':<10}{'STATE':<12}{'DOWN':>14}{'UP':>14}")
        for link in links:
            lines.append(
                f"{link['name']:<10}{link['kind']:<10}{link['priority']:<10}{link['state']:<12}"
                f"{format_rate(link['rx_bps']):>14}{format_rate(link['tx_bps']):>14}"
            )
    else:
        lines.append("no links configured")
    return "\n".join(lines)


def _client(args) -> ControlClient:
    return ControlClient(args.control)


def cmd_status(args) -> int:
    with _client(args) as client:
        status = client.call("status")
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(render_status(status))
    return 0


def cmd_up(args) -> int:
    pairing = args.pairing
    if pairing is None and not sys.stdin.isatty() and args.pairing_stdin:
        pairing = sys.stdin.readline().strip()
    with _client(args) as client:
        status = client.call("up", **({"pairing": pairing} if pairing else {}))
    print(render_status(status))
    return 0


def cmd_down(args) -> int:
    with _client(args) as client:
        status = client.call("down")
    print(render_status(status))
    return 0


def cmd_daemon(args) -> int:
    from braid.daemon.links.model import parse_link_option
    from braid.daemon.service import DaemonConfig, cleanup, run_daemon
    from braid.daemon.tunnel.socks import parse_listen

    state_dir = Path(args.state_dir)
    if os.geteuid() != 0:
        print(
            "braid daemon changes routing and MPTCP endpoints and must run as root "
            "(or as the braidd service with CAP_NET_ADMIN)",
            file=sys.stderr,
        )
        return 1
    if args.cleanup:
        cleanup(state_dir)
        print("removed Braid's routing tables, rules and MPTCP endpoints left by a previous run")
        return 0
    try:
        links = [parse_link_option(text) for text in args.link]
        socks = parse_listen(args.socks)
    except ValueError as exc:
        print(f"braid daemon: {exc}", file=sys.stderr)
        return 2
    config = DaemonConfig(
        state_dir=state_dir,
        control_path=Path(args.control or default_control_path()),
        socks=socks,
        links=links,
        discover=args.discover,
    )
    return run_daemon(config)


def cmd_demo(args) -> int:
    from braid.demo import run_demo

    return run_demo(duration=args.duration, size_mib=args.size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="braid",
        description="Braid bonds your Ethernet, Wi-Fi and tethered links into one connection.",
    )
    parser.add_argument(
        "--control",
        help="the daemon's control socket (default: $BRAID_CONTROL or /run/braid/control.sock)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("daemon", help="run braidd in the foreground (root)")
    p.add_argument("--state-dir", default="/var/lib/braid", help="where the daemon keeps its state")
    p.add_argument("--socks", default="127.0.0.1:1080", help="SOCKS5 listen address (loopback)")
    p.add_argument(
        "--link",
        action="append",
        default=[],
        metavar="IFACE[:KIND[:PRIORITY]]",
        help="an interface to use, its kind (ethernet, wifi, cellular, other) and priority "
        "(always, backup, never); repeat for each link, in order of preference",
    )
    p.add_argument(
        "--discover",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also use every Ethernet, Wi-Fi and cellular interface found (default: the setting)",
    )
    p.add_argument(
        "--cleanup", action="store_true", help="remove leftovers of a crashed run and exit"
    )
    p.set_defaults(func=cmd_daemon)

    p = sub.add_parser("up", help="connect through the paired server")
    p.add_argument("--pairing", help="the braid://… URI printed by braid-server init")
    p.add_argument("--pairing-stdin", action="store_true", help="read the pairing URI from stdin")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="disconnect")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", help="show the connection and its links")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("demo", help="run Braid on emulated links in network namespaces (root)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of traffic to show")
    p.add_argument("--size", type=int, default=0, help="download this many MiB instead")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("pyroute2").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except DaemonUnavailable as exc:
        print(f"braid: {exc}", file=sys.stderr)
        return 3
    except ControlError as exc:
        print(f"braid: {exc.message}", file=sys.stderr)
        return 4 if exc.code == "forbidden" else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
