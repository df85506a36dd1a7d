"""The braid-server command: ``init`` once, ``show`` any time, ``run`` under systemd."""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
import sys

import braid
from braid import logs
from braid.protocol.pairing import Pairing
from braid.server.state import (
    ServerConfig,
    StateDir,
    StateError,
    check_public_host,
    hash_token,
    is_wildcard,
    new_token,
    parse_listen,
)

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
        "--new-token",
        action="store_true",
        help="replace the token of an initialised server (the old one stops working)",
    )

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
        token = new_token()
        fp = state.fingerprint()
        config.token_sha256 = hash_token(token)
        _save(state, config)
        print(f"Replaced the token of {state.path}: clients paired before must pair again.")
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
    except ValueError as exc:
        raise CliError(str(exc)) from None
    token = new_token()
    config = ServerConfig(host, port, public, hash_token(token))
    try:
        state.create(config)
    except OSError as exc:
        raise CliError(f"cannot create {state.path}: {exc.strerror or exc}") from None
    fp = state.fingerprint()
    print(f"Initialised {state.path}")
    print(f"Listening on {config.listen}; clients connect to {public}:{port}")
    print(f"Certificate fingerprint (SHA-256): {fp}")
    print(f"Start the server with: braid-server run --state-dir {args.state_dir}")
    print("Pair a client with this URI (keep it secret, it is shown only once):")
    print(_pairing(config, fp, token).uri())
    return 0


def _save(state: StateDir, config: ServerConfig) -> None:
    try:
        state.save(config)
    except OSError as exc:
        raise CliError(f"cannot write {state.config_path}: {exc.strerror or exc}") from None


def cmd_show(args: argparse.Namespace) -> int:
    state = StateDir(args.state_dir)
    config = state.load()
    print(f"host: {config.public_host}")
    print(f"port: {config.listen_port}")
    print(f"listen: {config.listen}")
    print(f"fingerprint: {state.fingerprint()}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from braid.server.server import BraidServer, open_listener
    from braid.server.system import raise_subflow_limit
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
    server = BraidServer(config, tls, listener, state=state)
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
    handler = {"init": cmd_init, "show": cmd_show, "run": cmd_run}[args.command]
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
