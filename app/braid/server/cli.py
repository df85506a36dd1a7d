"""The braid-server command: ``init`` once, ``device add/list/remove`` for each device,
``show`` any time, ``run`` under systemd."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import ssl
import sys
import time

import braid
from braid import logs
from braid.protocol.pairing import Pairing
from braid.server.state import (
    MAX_DEVICES,
    Device,
    ServerConfig,
    StateDir,
    StateError,
    check_device_name,
    check_public_host,
    hash_token,
    is_wildcard,
    new_token,
    now_iso,
    parse_listen,
    read_seen,
)
from braid.units import format_bytes

log = logging.getLogger("braid.server")


class CliError(Exception):
    """A problem the user can fix; printed as one line, exit status 1."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="braid-server",
        description="The server end of Braid: relays a laptop's bonded MPTCP connections.",
    )
    parser.add_argument(
        "--version", action="version", version=f"braid-server {_version()}", help="show the version"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser("init", help="create the state directory and print the pairing URI")
    init.add_argument("--state-dir", required=True, metavar="DIR")
    init.add_argument("--listen", metavar="ADDR:PORT", help="e.g. 0.0.0.0:7443 or [::]:7443")
    init.add_argument(
        "--public-host",
        metavar="HOST",
        help="name or address clients connect to (needed when listening on all addresses)",
    )
    init.add_argument(
        "--device",
        default="first-device",
        metavar="NAME",
        help="name of the first device (default: first-device)",
    )
    init.add_argument(
        "--new-token",
        action="store_true",
        help="replace the token of a server's only device (the old one stops working)",
    )

    device = sub.add_parser("device", help="add, list or remove the devices that may connect")
    device_sub = device.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    add = device_sub.add_parser("add", help="add a device and print its pairing URI")
    add.add_argument("name", metavar="NAME", help="e.g. alice-laptop")
    add.add_argument("--state-dir", required=True, metavar="DIR")
    listing = device_sub.add_parser("list", help="each device's last contact, tunnels and bytes")
    listing.add_argument("--state-dir", required=True, metavar="DIR")
    remove = device_sub.add_parser("remove", help="remove a device: it is cut off at once")
    remove.add_argument("name", metavar="NAME")
    remove.add_argument("--state-dir", required=True, metavar="DIR")

    show = sub.add_parser("show", help="print the server's address and certificate fingerprint")
    show.add_argument("--state-dir", required=True, metavar="DIR")

    run = sub.add_parser("run", help="run the server")
    run.add_argument("--state-dir", required=True, metavar="DIR")
    run.add_argument("-v", "--verbose", action="store_true", help="log every connection")
    return parser


def _pairing(config: ServerConfig, fp: str, token: str) -> Pairing:
    # The URI carries the port clients dial, which is the one we listen on.
    return Pairing(config.public_host, config.listen_port, fp, token)


def cmd_init(args: argparse.Namespace) -> int:
    state = StateDir(args.state_dir)
    if state.is_initialised():
        config = state.load()
        if not args.new_token:
            print(f"{state.path} is already initialised: nothing was changed.")
            print(f"Server: {config.public_host}:{config.listen_port} on {config.listen}")
            print(f"Certificate fingerprint (SHA-256): {state.fingerprint()}")
            print(
                "Only a hash of the token is stored, so the pairing URI cannot be shown again. "
                "To pair a client, make a new token (the old one stops working):"
            )
            print(f"  braid-server init --state-dir {args.state_dir} --new-token")
            return 0
        if len(config.devices) != 1:
            raise CliError(
                f"this server has {len(config.devices)} devices: replace one device's token "
                f"with: braid-server device remove NAME --state-dir {args.state_dir}, then "
                f"braid-server device add NAME --state-dir {args.state_dir}"
            )
        token = new_token()
        fp = state.fingerprint()
        old = config.devices[0]
        config.devices = [Device(old.name, hash_token(token), now_iso())]
        _save(state, config)
        print(
            f"Replaced the token of {old.name} on {state.path}: "
            "clients paired before must pair again."
        )
        print("Pair a client with this URI (keep it secret, it is shown only once):")
        print(_pairing(config, fp, token).uri())
        return 0

    if not args.listen:
        raise CliError("initialising a server needs --listen ADDR:PORT, e.g. --listen [::]:7443")
    try:
        host, port = parse_listen(args.listen)
        if args.public_host:
            public = check_public_host(args.public_host)
        elif is_wildcard(host):
            raise CliError(
                f"the server listens on all addresses ({args.listen}): pass --public-host "
                "with the name or address clients use to reach it"
            )
        else:
            public = host
        name = check_device_name(args.device)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    token = new_token()
    config = ServerConfig(host, port, public, [Device(name, hash_token(token), now_iso())])
    try:
        state.create(config)
    except OSError as exc:
        raise CliError(f"cannot create {state.path}: {exc.strerror or exc}") from None
    fp = state.fingerprint()
    print(f"Initialised {state.path}")
    print(f"Listening on {config.listen}; clients connect to {public}:{port}")
    print(f"Certificate fingerprint (SHA-256): {fp}")
    print(f"Start the server with: braid-server run --state-dir {args.state_dir}")
    print(f"Add more devices with: braid-server device add NAME --state-dir {args.state_dir}")
    print(f"Pair the device {name} with this URI (keep it secret, it is shown only once):")
    print(_pairing(config, fp, token).uri())
    return 0


def _save(state: StateDir, config: ServerConfig) -> None:
    try:
        state.save(config)
    except OSError as exc:
        raise CliError(f"cannot write {state.config_path}: {exc.strerror or exc}") from None


def cmd_device(args: argparse.Namespace) -> int:
    state = StateDir(args.state_dir)
    config = state.load()
    if args.device_command == "list":
        return _list_devices(state, config)
    try:
        name = check_device_name(args.name)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    existing = config.device(name)
    if args.device_command == "add":
        if existing is not None:
            raise CliError(
                f"there is already a device called {existing.name}; to give it a new token, "
                f"remove it first (braid-server device remove {existing.name} "
                f"--state-dir {args.state_dir})"
            )
        if len(config.devices) >= MAX_DEVICES:
            raise CliError(f"this server has {MAX_DEVICES} devices already; remove one first")
        token = new_token()
        fp = state.fingerprint()
        config.devices = [*config.devices, Device(name, hash_token(token), now_iso())]
        _save(state, config)
        print(f"Added the device {name}; a running server accepts it at once.")
        print(f"Pair {name} with this URI (keep it secret, it is shown only once):")
        print(_pairing(config, fp, token).uri())
        return 0
    if existing is None:
        names = ", ".join(d.name for d in config.devices) or "none"
        raise CliError(f"there is no device called {name} (devices: {names})")
    config.devices = [d for d in config.devices if d is not existing]
    _save(state, config)
    print(
        f"Removed the device {existing.name}: a running server closes its tunnels within "
        "a second and refuses it from now on."
    )
    if not config.devices:
        print("No device may connect now; add one with: braid-server device add NAME ...")
    return 0


def _ago(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 0):.0f} s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def _list_devices(state: StateDir, config: ServerConfig) -> int:
    written, seen = read_seen(state)
    now = time.time()
    live = now - written < 90  # a running server rewrites it at least once a minute
    rows = [("DEVICE", "ADDED", "LAST CONTACT", "FROM", "TUNNELS", "UP", "DOWN")]
    for device in config.devices:
        activity = seen.get(device.name)
        added = device.added[:10] or "-"
        if activity is None or not activity.last_contact:
            rows.append((device.name, added, "never", "-", "0" if live else "-", "0 B", "0 B"))
            continue
        rows.append(
            (
                device.name,
                added,
                _ago(now - activity.last_contact),
                activity.address,
                str(activity.open) if live else "-",
                format_bytes(activity.bytes_up),
                format_bytes(activity.bytes_down),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    if not config.devices:
        print("(no devices: add one with braid-server device add NAME)")
    if written and not live:
        stamp = datetime.datetime.fromtimestamp(written, datetime.UTC).strftime("%Y-%m-%d %H:%M")
        print(f"The server has not reported since {stamp} UTC: is it running? (TUNNELS unknown)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    state = StateDir(args.state_dir)
    config = state.load()
    print(f"host: {config.public_host}")
    print(f"port: {config.listen_port}")
    print(f"listen: {config.listen}")
    print(f"fingerprint: {state.fingerprint()}")
    print(f"devices: {', '.join(d.name for d in config.devices) or 'none'}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from braid.server.server import BraidServer, open_listener
    from braid.server.system import raise_descriptor_limit, raise_subflow_limit
    from braid.transport import server_tls_context

    logs.setup(args.verbose, with_names=False)
    state = StateDir(args.state_dir)
    config = state.load()
    fp = state.fingerprint()
    if not state.key_path.is_file():
        raise CliError(f"the private key {state.key_path} is missing")
    try:
        tls = server_tls_context(str(state.cert_path), str(state.key_path))
    except (OSError, ssl.SSLError) as exc:
        raise CliError(
            f"cannot load the certificate and key from {state.path}: {exc.strerror or exc}"
        ) from None
    listener, mptcp = open_listener(config.listen_host, config.listen_port)
    if mptcp:
        raise_subflow_limit()
    files = raise_descriptor_limit()
    server = BraidServer(config, tls, listener, state=state, max_files=files)
    log.info(
        "listening on %s (%s); clients connect to %s:%d; certificate %s",
        config.listen,
        "MPTCP" if mptcp else "plain TCP",
        config.public_host,
        config.listen_port,
        fp,
    )
    asyncio.run(server.serve())
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    from braid.server.server import ListenError

    args = _parser().parse_args(argv)
    handler = {"init": cmd_init, "device": cmd_device, "show": cmd_show, "run": cmd_run}[
        args.command
    ]
    try:
        return handler(args)
    except (CliError, StateError, ListenError) as exc:
        print(f"braid-server: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _version() -> str:
    return getattr(braid, "__version__", "unknown")


if __name__ == "__main__":
    sys.exit(main())
