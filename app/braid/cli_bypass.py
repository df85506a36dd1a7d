"""The split tunnel on the command line: ``braid bypass add|remove|list``, ``braid direct -- CMD``
and ``braid bonded -- CMD``.

The bypass list is the ``bypass`` setting: addresses, networks and domain names (a name covers
its subdomains) that reach the internet without Braid in system-wide mode. Entries are checked
here first, so a typo is named before anything is sent, and braidd checks them again: a list
with a bad entry is refused whole and the saved settings keep their old content.

``braid direct`` and ``braid bonded`` ask braidd to move this very process (braidd reads its pid
from the control socket) into Braid's cgroup of that name, then replace it with the command, which
keeps the pid and the cgroup: in system-wide mode a direct program's traffic leaves directly; in
proxy mode a bonded program's TCP goes through Braid without proxy settings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from braid.bypass import split_bypass


def _normalised(entry: str) -> str:
    """An entry as the list keeps it: a network in its short form, a name in lower case."""
    found = split_bypass([entry])
    return (found.networks or found.names)[0]


def cmd_bypass(args) -> int:
    from braid.cli import _client

    if args.action in ("add", "remove") and not args.entries:
        print(
            f"braid bypass {args.action}: name at least one address, network or domain, "
            f"e.g. braid bypass {args.action} netflix.com",
            file=sys.stderr,
        )
        return 2
    try:
        wanted = [_normalised(entry) for entry in args.entries]
    except ValueError as exc:
        print(f"braid bypass: {exc}", file=sys.stderr)
        return 2
    with _client(args) as client:
        current = list(client.call("get-settings")["values"].get("bypass") or [])
        if args.action != "list":
            known = {_normalised_or_self(entry): entry for entry in current}
            if args.action == "add":
                new = current + [entry for entry in wanted if entry not in known]
            else:
                missing = [entry for entry in wanted if entry not in known]
                if missing:
                    print(
                        f"braid bypass: not in the list: {', '.join(missing)} "
                        "(see: braid bypass list)",
                        file=sys.stderr,
                    )
                    return 1
                drop = {known[entry] for entry in wanted}
                new = [entry for entry in current if entry not in drop]
            if new != current:
                client.call("set-settings", settings={"bypass": new})
            current = new
    if args.json:
        print(json.dumps(current))
    else:
        for entry in current:
            print(entry)
    return 0


def _normalised_or_self(entry: str) -> str:
    try:
        return _normalised(entry)
    except ValueError:
        return entry


def cmd_routed(args) -> int:
    from braid.cli import _client

    route = args.command
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print(
            f"braid {route}: give the command to run, e.g. braid {route} -- curl https://example.com",
            file=sys.stderr,
        )
        return 2
    program = shutil.which(argv[0])
    if program is None:
        print(f"braid {route}: no such command: {argv[0]}", file=sys.stderr)
        return 127
    with _client(args) as client:
        client.call("route-process", route=route)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(program, argv)
    return 0  # not reached


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``braid bypass``, ``braid direct`` and ``braid bonded``: added to the command line's."""
    p = sub.add_parser(
        "bypass",
        help="addresses, networks and domains that go direct in system-wide mode",
        description="Addresses, networks and domain names (example.com covers its subdomains) "
        "reached without Braid in system-wide mode. Their DNS still goes through the tunnel.",
    )
    p.add_argument("action", nargs="?", choices=["list", "add", "remove"], default="list")
    p.add_argument("entries", nargs="*", metavar="ENTRY", help="e.g. netflix.com, 192.0.2.0/24")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=cmd_bypass)

    for route, text in (
        ("direct", "run a command whose traffic goes direct, not through Braid (system-wide mode)"),
        (
            "bonded",
            "run a command whose TCP goes through Braid without proxy settings (proxy mode)",
        ),
    ):
        p = sub.add_parser(route, help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG ...]")
        p.set_defaults(func=cmd_routed)
