"""``braid doctor``: asks braidd why it does or does not aggregate, and prints it per link.

braidd does the checks (the ``doctor`` control command, :mod:`braid.daemon.doctor`): a TCP
connection to the server through each link, opened as MPTCP to see whether the option survives
the path, and whether a subflow through each link joins a tunnel; the health probes for UDP and
the idle round trip; the subflows of the tunnels spread over every link; each link's
reverse-path filter; the MPTCP limits and counters. It answers within a few seconds.

``braid doctor --speed`` asks for the ``speed-test`` command instead (:mod:`braid.daemon.speed`):
each link's download and upload, then all links bonded, within 30 s, with a progress line on
stderr drawn from the progress messages braidd sends before its answer.
"""

from __future__ import annotations

import argparse
import json
import sys

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


def _finding(finding: dict) -> str:
    return f"  [{MARK[finding['level']]}] {finding['check']:<9} {finding['text']}"


def render(report: dict) -> str:
    lines = [f"Braid doctor — server {report.get('server') or '(not paired)'}"]
    for link in report["links"]:
        lines.append("")
        lines.append(
            f"{link['name']} ({link['kind']}): {link['level']} — {LINK_VERDICTS[link['level']]}"
        )
        lines += map(_finding, link["findings"])
    lines.append("")
    lines.append("this laptop:")
    lines += map(_finding, report["laptop"])
    if report.get("server_checks"):
        lines.append("")
        lines.append("the server:")
        lines += map(_finding, report["server_checks"])
    lines.append("")
    lines.append(f"=> {VERDICTS[report['level']]}")
    return "\n".join(lines)


def _rate(mbps: float | None) -> str:
    if mbps is None:
        return "—"
    return f"{mbps:.0f} Mbit/s" if mbps >= 100 else f"{mbps:.1f} Mbit/s"


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count < 1e8 else f"{count / 1e6:.0f} MB"


def _round_trips(link: dict) -> str:
    """ "11 ms idle, 34 ms downloading, 52 ms uploading" (what is known of it)."""
    parts = [
        f"{link[key]:.0f} ms {label}"
        for key, label in (
            ("rtt_idle_ms", "idle"),
            ("rtt_down_ms", "downloading"),
            ("rtt_up_ms", "uploading"),
        )
        if link.get(key) is not None
    ]
    return ", ".join(parts)


def speed_line(link: dict) -> str:
    """One link's figures of a speed test, in words."""
    if link["skipped"]:
        return f"{link['name']}: not tested ({link['skipped']})"
    text = f"{link['name']}: down {_rate(link['down_mbps'])}, up {_rate(link['up_mbps'])}"
    rtts = _round_trips(link)
    if rtts:
        text += f"; round trip {rtts}"
    return text + (f" ({link['error']})" if link["error"] else "")


def progress_text(news: dict) -> str:
    """A speed test's progress message in words: "[3/10] wlan0: download 9.3 Mbit/s (…)"."""
    name = "all links bonded" if news.get("link") == "bonded" else news.get("link")
    what = "download" if news.get("direction") == "down" else "upload"
    rate = f" {_rate(news['mbps'])}" if news.get("mbps") is not None else "…"
    return (
        f"[{news.get('step')}/{news.get('steps')}] {name}: {what}{rate}  "
        f"({news.get('elapsed', 0):.0f} s of at most {news.get('time_limit', 0):.0f} s)"
    )


def render_speed(result: dict) -> str:
    """The speed test in plain words: one line per link, then the bonded total."""
    lines = [
        f"Braid speed test — server {result['server']} ({result['seconds']:g} s each way per test)"
    ]
    lines += [speed_line(link) for link in result["links"]]
    bonded = result["bonded"]
    if bonded["skipped"]:
        lines.append(f"all links bonded: not tested ({bonded['skipped']})")
    else:
        text = f"all links bonded: down {_rate(bonded['down_mbps'])}, up {_rate(bonded['up_mbps'])}"
        spans = bonded.get("links") or []
        tested = [link["name"] for link in result["links"] if not link["skipped"]]
        missing = [name for name in tested if name not in spans]
        if missing:
            text += f" (without {', '.join(missing)}: its subflow did not join in time)"
        if bonded["error"]:
            text += f" ({bonded['error']})"
        lines.append(text)
    lines.append(f"took {result['elapsed_s']:.0f} s and moved {_megabytes(result['bytes'])}")
    return "\n".join(lines)


class SpeedProgress:
    """The progress line of ``braid doctor --speed`` on stderr: redrawn in place on a terminal,
    a line per step otherwise."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._last_step = 0
        self._width = 0

    def __call__(self, news: dict) -> None:
        text = progress_text(news)
        if self.tty:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        elif news.get("step") != self._last_step:
            self.stream.write(text + "\n")
        self._last_step = news.get("step", 0)
        self.stream.flush()

    def done(self) -> None:
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()


def cmd_speed(args) -> int:
    from braid.client import ControlClient
    from braid.protocol.control import ControlError, ErrorCode

    progress = SpeedProgress()
    if not args.json and not progress.tty:
        print("measuring each link, then all bonded (at most 30 s) …", file=sys.stderr)
    request = {} if args.seconds is None else {"seconds": args.seconds}
    try:
        # Progress arrives twice a second: a silence this long means braidd is stuck.
        with ControlClient(args.control, timeout=WAIT) as client:
            result = client.call("speed-test", on_progress=progress, **request)
    except ControlError as exc:
        progress.done()
        if exc.code == ErrorCode.UNKNOWN_COMMAND:
            raise ControlError(
                exc.code, "this braidd is too old for a speed test: update Braid and restart it"
            ) from None
        raise
    progress.done()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render_speed(result))
    measured = [
        entry
        for entry in [*result["links"], result["bonded"]]
        if not entry["skipped"] and entry["down_mbps"] is not None
    ]
    return 0 if measured else 1


def cmd_doctor(args) -> int:
    from braid.client import ControlClient

    if args.speed:
        return cmd_speed(args)
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
    p.add_argument(
        "--speed",
        action="store_true",
        help="measure each link's download and upload to the server, then all links bonded "
        "(at most 30 s; moves about rate x 3 s per link each way, and the same bonded)",
    )
    p.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="with --speed: how long each transfer lasts (0.5 to 5; default 3, less with "
        "many links so that the whole test ends within 30 s)",
    )
    p.set_defaults(func=cmd_doctor)
