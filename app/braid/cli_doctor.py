"""``braid doctor``: asks braidd why it does or does not aggregate, and prints it per link.

braidd does the checks (the ``doctor`` control command, :mod:`braid.daemon.doctor`): a TCP
connection to the server through each link, opened as MPTCP to see whether the option survives
the path, and whether a subflow through each link joins a tunnel; the health probes for UDP and the idle round trip; the subflows of the tunnels spread
over every link; each link's reverse-path filter; the MPTCP limits and counters. It answers
within a few seconds.
"""

from __future__ import annotations

import argparse
import json

MARK = {"ok": "ok", "warning": "!!", "error": "XX"}
#: What a level means, for a link and for the whole report (the tray shows the same words).
LINK_VERDICTS = {
    "ok": "works",
    "warning": "works, but see the warning",
    "error": "Braid cannot use it as it is",
}
VERDICTS = {"ok": "nothing wrong found", "warning": "warnings above", "error": "problems above"}
#: braidd answers within about 7 s; the command gives it a little more.
WAIT = 15.0


def render(report: dict) -> str:
    lines = [f"Braid doctor — server {report.get('server') or '(not paired)'}"]
    for link in report["links"]:
        lines.append("")
        lines.append(
            f"{link['name']} ({link['kind']}): {link['level']} — {LINK_VERDICTS[link['level']]}"
        )
        for finding in link["findings"]:
            lines.append(f"  [{MARK[finding['level']]}] {finding['check']:<9} {finding['text']}")
    lines.append("")
    lines.append("this laptop:")
    for finding in report["laptop"]:
        lines.append(f"  [{MARK[finding['level']]}] {finding['check']:<9} {finding['text']}")
    lines.append("")
    lines.append(f"=> {VERDICTS[report['level']]}")
    return "\n".join(lines)


def cmd_doctor(args) -> int:
    from braid.client import ControlClient

    with ControlClient(args.control, timeout=WAIT) as client:
        report = client.call("doctor")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report))
    return 0 if report["level"] != "error" else 1


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``braid doctor``: added to the command line's."""
    p = sub.add_parser(
        "doctor",
        help="check each link: server reachable by TCP and UDP, MPTCP through it, round trip, "
        "reverse-path filter; and the MPTCP limits",
        description="Ask braidd to check, per link, whether the server's TCP and UDP port are "
        "reachable through it, whether MPTCP survives the path, its idle round trip and its "
        "reverse-path filter, whether a captive portal holds it, and the laptop's MPTCP "
        "limits, counters and other programs' (NetworkManager's) endpoints. Exits 1 when it "
        "finds a problem.",
    )
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p.set_defaults(func=cmd_doctor)
