"""The braid command: daemon, up, down, status, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import braid
from braid import logs, units
from braid.client import ControlClient, DaemonUnavailable, default_control_path
from braid.protocol.control import ControlError
from braid.protocol.pairing import PairingError, parse_pairing
from braid.units import format_bytes, format_duration, format_rate


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
        lines.append(render_links(links))
    else:
        lines.append("no links found (add one with: braid links add IFACE --kind KIND)")
    flows = (status.get("datagram") or {}).get("flows") or []
    if flows:
        lines.append("")
        lines.append(render_udp_flows(flows))
    for event in (status.get("events") or [])[-5:]:
        when = time.strftime("%H:%M:%S", time.localtime(event["t"]))
        lines.append(f"  [{when}] {event['message']}")
    for problem in status.get("problems") or []:
        lines.append(f"  ! {problem}")
    return "\n".join(lines)


def parse_size(text: str) -> int:
    """10G, 500M, 2GB, 1500000 → bytes (decimal units, as carriers bill)."""
    try:
        value = units.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value is None:
        raise argparse.ArgumentTypeError("give a size, e.g. 10G")
    return value


def render_udp_flows(flows: list[dict]) -> str:
    """Which path each UDP flow takes: sealed datagrams over which links, or the tunnel."""
    lines = [f"{'UDP FLOW':<34}{'CLASS':<10}{'MODE':<11}{'PATH':<10}LINKS"]
    for flow in flows:
        lines.append(
            f"{flow['destination']:<34}{flow['class']:<10}{flow['mode']:<11}{flow['path']:<10}"
            f"{', '.join(flow['links']) or '-'}"
        )
    return "\n".join(lines)


def render_links(links: list[dict]) -> str:
    lines = [
        f"{'LINK':<10}{'KIND':<10}{'PRIORITY':<10}{'STATE':<18}{'HEALTH':<8}"
        f"{'RTT':>8}{'LOSS':>7}{'DOWN':>14}{'UP':>14}  DATA"
    ]
    for link in links:
        priority = link["priority"]
        if link.get("effective_priority", priority) != priority:
            priority = f"{link['effective_priority']}*"
        health = {True: "ok", False: "dead", None: "-"}[link.get("alive")]
        rtt = f"{link['rtt_ms']:.0f}ms" if link.get("rtt_ms") is not None else "-"
        loss = f"{link['loss'] * 100:.0f}%" if link.get("loss") is not None else "-"
        data = format_bytes(link.get("used_bytes", 0))
        if link.get("cap"):
            data += f" of {format_bytes(link['cap']['limit_bytes'])}/{link['cap']['period']}"
        state = link["state"]
        if state == "up" and link.get("connectivity") == "portal":
            state = "sign-in required"
        lines.append(
            f"{link['name']:<10}{link['kind']:<10}{priority:<10}{state:<18}{health:<8}"
            f"{rtt:>8}{loss:>7}{format_rate(link['rx_bps']):>14}{format_rate(link['tx_bps']):>14}  {data}"
        )
    if any(link.get("capped") for link in links):
        lines.append("* over its data cap")
    if any(link.get("connectivity") == "portal" for link in links):
        lines.append(
            "sign-in required: a captive portal holds the link (NetworkManager's check); open any "
            "web page on that network to sign in, and Braid uses it again"
        )
    return "\n".join(lines)


LINK_EXAMPLES = {
    "set": "braid links set usb0 --priority backup",
    "add": "braid links add enx0c5b8f279a64 --kind cellular",
    "remove": "braid links remove enx0c5b8f279a64",
}


def cmd_links(args) -> int:
    if args.action in LINK_EXAMPLES and not args.iface:
        print(
            f"braid links {args.action}: name the interface, e.g. {LINK_EXAMPLES[args.action]}",
            file=sys.stderr,
        )
        if args.action == "add":
            with _client(args) as client:
                others = [i for i in client.call("interfaces") if not i["link"]]
            if others:
                print("interfaces that are not links:", file=sys.stderr)
                for item in others:
                    print(
                        f"  {item['name']:<16}{item['kind']:<10}{item['reason']}", file=sys.stderr
                    )
        return 2
    with _client(args) as client:
        if args.action == "add":
            client.call("add-link", link=args.iface, kind=args.kind)
        elif args.action == "remove":
            client.call("remove-link", link=args.iface)
        elif args.action == "set":
            changes = {}
            if args.priority:
                changes["priority"] = args.priority
            if args.order is not None:
                changes["order"] = args.order
            if args.metered is not None:
                changes["metered"] = args.metered
            if args.kind:
                changes["kind"] = args.kind
            if args.no_cap:
                changes["cap"] = None
            elif args.cap is not None:
                changes["cap"] = {
                    "limit_bytes": args.cap,
                    "period": args.period,
                    "reset_day": args.reset_day,
                    "then": args.then,
                }
            client.call("set-link", link=args.iface, **changes)
        links = client.call("links")
    if args.json:
        print(json.dumps(links, indent=2))
    else:
        print(render_links(links))
    return 0


def cmd_watch(args) -> int:
    """Live samples from the daemon, one block a second, until Ctrl-C."""
    with _client(args) as client:
        client.call("subscribe")
        shown = 0
        for message in client.stream():
            if message.get("event") == "sample":
                if args.json:
                    print(json.dumps(message), flush=True)
                    continue
                if sys.stdout.isatty():
                    print("\033[H\033[J", end="")
                tunnel = message["tunnel"]
                print(
                    f"Braid {message['state']} — server {message.get('server') or '-'} — "
                    f"total {format_rate(tunnel['rx_bps'])} down, {format_rate(tunnel['tx_bps'])} up"
                )
                print(render_links(message["links"]), flush=True)
                shown += 1
                if args.count and shown >= args.count:
                    return 0
            elif not args.json:
                print(
                    f"[{time.strftime('%H:%M:%S', time.localtime(message.get('t', 0)))}] "
                    f"{message.get('message', message.get('event'))}",
                    flush=True,
                )
            else:
                print(json.dumps(message), flush=True)
    return 0


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


MAX_PAIRING = 4096  # a pairing URI is about 150 characters; read no more than this


def read_pairing(args) -> str | None:
    """The pairing URI from ``--pairing-file``, from stdin or a prompt (``--pairing -``), or
    from the command line (with a warning); None when none was given."""
    if args.pairing_file is not None:
        try:
            with open(args.pairing_file, encoding="utf-8", errors="replace") as f:
                text = f.read(MAX_PAIRING)
        except OSError as exc:
            raise UsageError(f"cannot read {args.pairing_file}: {exc.strerror or exc}") from None
        return _first_line(text, f"{args.pairing_file} holds no pairing URI")
    if args.pairing == "-" or (args.pairing is None and args.pairing_stdin):
        if sys.stdin.isatty():
            import getpass

            text = getpass.getpass("Pairing URI (braid://…, not shown): ")
        else:
            text = ""
            while not text.strip() and (line := sys.stdin.readline(MAX_PAIRING)):
                text = line
        return _first_line(text, "no pairing URI on stdin")
    if args.pairing is not None and "token=" in args.pairing:
        print(
            "braid up: warning: a token on the command line can be read by every user of this "
            "computer (ps, /proc) and stays in your shell history; next time use "
            "--pairing-file FILE, or --pairing - and paste it",
            file=sys.stderr,
        )
    return args.pairing


def _first_line(text: str, empty: str) -> str:
    """The first non-blank line of ``text``, checked to be a pairing URI."""
    for line in text.splitlines():
        if line.strip():
            try:
                parse_pairing(line)
            except PairingError as exc:
                raise UsageError(str(exc)) from None
            return line.strip()
    raise UsageError(empty)


class UsageError(Exception):
    """A mistake on the command line; the message says which."""


def cmd_up(args) -> int:
    try:
        pairing = read_pairing(args)
    except UsageError as exc:
        print(f"braid up: {exc}", file=sys.stderr)
        return 2
    request = {"pairing": pairing} if pairing else {}
    if args.mode:
        request["mode"] = args.mode
    with _client(args) as client:
        status = client.call("up", **request)
    print(render_status(status))
    return 0


def cmd_down(args) -> int:
    with _client(args) as client:
        status = client.call("down")
    print(render_status(status))
    return 0


def cmd_daemon(args) -> int:
    from braid.daemon.links.model import parse_link_option
    from braid.daemon.routing.apps import check_name as check_cgroup_name
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
        cleanup(state_dir, args.cgroup)
        print("removed Braid's routing tables, rules and MPTCP endpoints left by a previous run")
        return 0
    try:
        links = [parse_link_option(text) for text in args.link]
        socks = parse_listen(args.socks)
        check_cgroup_name(args.cgroup)
    except ValueError as exc:
        print(f"braid daemon: {exc}", file=sys.stderr)
        return 2
    config = DaemonConfig(
        state_dir=state_dir,
        control_path=Path(args.control or default_control_path()),
        socks=socks,
        links=links,
        discover=args.discover,
        cgroup=args.cgroup,
    )
    return run_daemon(config)


def cmd_tray(args) -> int:
    if getattr(sys, "frozen", False):
        # The packaged tray is a bundle of its own, next to this one.
        import shutil

        tray = shutil.which("braid-tray")
        if tray is None:
            print("braid tray: braid-tray is not installed", file=sys.stderr)
            return 1
        argv = [tray, *(["--control", args.control] if args.control else []), *args.tray_args]
        os.execv(tray, argv)
    try:
        from braid.gui.app import main as tray_main
    except ImportError as exc:
        print(
            f"braid tray needs the desktop parts (PySide6, pyqtgraph): {exc}. "
            "Install them with: pip install 'braid[gui]'",
            file=sys.stderr,
        )
        return 1
    argv = list(args.tray_args)
    if args.control:
        argv = ["--control", args.control, *argv]
    return tray_main(argv)


def cmd_demo(args) -> int:
    try:
        from braid.demo import run_demo
    except ImportError:
        print(
            "braid demo runs from a source checkout (it needs the test world): "
            "clone the repository and run ./dev demo",
            file=sys.stderr,
        )
        return 1

    return run_demo(duration=args.duration, size_mib=args.size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="braid",
        description="Braid bonds your Ethernet, Wi-Fi and tethered links into one connection.",
    )
    parser.add_argument(
        "--version", action="version", version=f"braid {_version()}", help="show the version"
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
    p.add_argument(
        "--cgroup",
        default="braid",
        help="the cgroup holding programs run with braid direct/bonded (default: braid)",
    )
    p.set_defaults(func=cmd_daemon)

    p = sub.add_parser("up", help="connect through the paired server")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--pairing",
        metavar="URI|-",
        help="the braid://… URI printed by braid-server init; - reads it from stdin, or asks "
        "for it without showing it (a URI given here is visible to every local user)",
    )
    source.add_argument(
        "--pairing-file", metavar="PATH", help="read the pairing URI from this file"
    )
    source.add_argument("--pairing-stdin", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--mode",
        choices=["proxy", "system"],
        help="proxy: only the SOCKS5 port; system: all traffic (kept as the setting)",
    )
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="disconnect")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", help="show the connection and its links")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "links",
        help="list the links, change one (links set IFACE ...), or add an interface braidd "
        "skipped (links add IFACE [--kind KIND]; links remove IFACE undoes it)",
    )
    p.add_argument("action", nargs="?", choices=["list", "set", "add", "remove"], default="list")
    p.add_argument("iface", nargs="?", help="the interface (with set, add, remove)")
    p.add_argument("--priority", choices=["always", "backup", "never"])
    p.add_argument("--order", type=int, help="position in the order of preference (0 first)")
    p.add_argument("--metered", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--kind", choices=["ethernet", "wifi", "cellular", "other"])
    p.add_argument("--cap", type=parse_size, help="data cap, e.g. 10G (per --period)")
    p.add_argument("--period", choices=["day", "month"], default="month")
    p.add_argument("--reset-day", type=int, default=1, help="day of the month the cap resets")
    p.add_argument(
        "--then",
        choices=["backup", "never"],
        default="never",
        help="what the link becomes at the cap",
    )
    p.add_argument("--no-cap", action="store_true", help="remove the data cap")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_links)

    p = sub.add_parser("watch", help="live per-link samples and events")
    p.add_argument("--json", action="store_true", help="print the raw JSON messages")
    p.add_argument("--count", type=int, default=0, help="stop after this many samples")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("tray", help="the tray icon, dashboard and settings (also: braid-tray)")
    p.add_argument("tray_args", nargs=argparse.REMAINDER, help="options for the tray (see --help)")
    p.set_defaults(func=cmd_tray)

    p = sub.add_parser("demo", help="run Braid on emulated links in network namespaces (root)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of traffic to show")
    p.add_argument("--size", type=int, default=0, help="download this many MiB instead")
    p.set_defaults(func=cmd_demo)

    from braid import cli_bypass

    cli_bypass.add_parsers(sub)
    from braid import cli_doctor

    cli_doctor.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.verbose)
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


def _version() -> str:
    return getattr(braid, "__version__", "unknown")


if __name__ == "__main__":
    sys.exit(main())
