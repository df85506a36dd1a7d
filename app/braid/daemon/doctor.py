"""``braid doctor``: why Braid is not aggregating, link by link, in plain words.

What is observed per link: a TCP connection to the server's port from the link's address and
device (with braidd's own mark, so system-wide capture lets it pass), opened as MPTCP — so the
same connection says whether the MPTCP option survives the path (a middlebox that strips it
makes the connection fall back to plain TCP); whether a subflow through it joins a tunnel
opened through the first link; the health probes' verdict, round trip and loss
(the probes are UDP to the server's port, so they say whether UDP gets through); the subflows
it has in the tunnels that spread over every link; its reverse-path filter; and whether
NetworkManager found a captive portal on it. For the laptop: the MPTCP limits, the kernel's MPTCP
counters (nstat's MPTcpExt*) and the MPTCP endpoints of other programs (NetworkManager's) in
braidd's namespace.

:func:`diagnose` turns the observations into findings and is pure; the readers below block and
run off the event loop (:func:`observe` does that), all within about 7 seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from braid.transport import mptcp_info

#: The whole diagnosis answers within this many seconds, whatever the links do.
TIME_LIMIT = 4.0
#: A TCP connection through a link gives up after this many seconds.
CONNECT_TIMEOUT = 3.0
#: How long a test subflow through each link may take to join.
JOIN_WAIT = 1.5
#: Counters that say the MPTCP option was lost or refused somewhere on a path.
FALLBACK_COUNTERS = ("MPCapableFallbackACK", "MPCapableFallbackSYNACK", "MPFallbackTokenInit")
JOIN_FAILURE_COUNTERS = (
    "MPJoinSynAckHMacFailure",
    "MPJoinAckHMacFailure",
    "MPJoinRejected",
    "MPJoinNoTokenFound",
)

OK, WARNING, ERROR = "ok", "warning", "error"
_RANK = {OK: 0, WARNING: 1, ERROR: 2}


@dataclass
class LinkObservation:
    """What braidd saw of one link (JSON-friendly)."""

    name: str
    kind: str = "other"
    priority: str = "always"  # the effective priority
    state: str = "up"
    address: str | None = None  # the source used towards the server
    default_route: bool = False  # it holds the main table's default route
    routed: bool = False  # Braid's routing table and rule for its address are in place
    tcp: str | None = None  # ok | refused | timeout | unreachable | error; None: not tried
    tcp_error: str | None = None
    connect_ms: float | None = None
    mptcp: bool | None = None  # the test connection kept MPTCP (None: no connection)
    join: bool | None = None  # a subflow through it joined a test connection (None: not tried)
    join_error: str | None = None  # why the path manager refused to open it
    probed: bool = False
    udp_alive: bool | None = None  # the probes' verdict (None: no verdict yet)
    rtt_ms: float | None = None
    jitter_ms: float | None = None
    loss: float | None = None
    subflows: int = 0  # subflows it has in the spread tunnels
    spread_tunnels: int = 0  # tunnels spread over every link right now
    rp_filter: int | None = None  # the effective value: max(all, the interface's)
    addresses: list[str] = field(default_factory=list)
    connectivity: str | None = None  # NetworkManager's check: none | portal | limited | full


@dataclass
class Observations:
    server: str | None = None
    connected: bool = False
    links: list[LinkObservation] = field(default_factory=list)
    limits: dict | None = None  # {"subflows": n, "add_addr_accepted": n}
    #: MPTCP endpoints that are not Braid's (NetworkManager's): id, address, flags, device.
    endpoints: list[dict] | None = field(default_factory=list)
    #: braidd opens the subflows itself (the userspace path manager): endpoints are unused.
    userspace_pm: bool = True
    counters: dict[str, int] = field(default_factory=dict)
    counters_since: str = "boot"  # or "braidd started"
    #: What the server says of itself (Command.INFO): version and MPTCP limits; or why not.
    server_info: dict | None = None
    server_info_error: str | None = None
    elapsed_ms: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Finding:
    # tcp | mptcp | join | udp | subflows | rtt | rp_filter | portal | limits | counters |
    # endpoints | link
    check: str
    level: str  # ok | warning | error
    text: str

    def to_json(self) -> dict:
        return {"check": self.check, "level": self.level, "text": self.text}


def worst(findings: list[Finding]) -> str:
    return max((f.level for f in findings), key=_RANK.__getitem__, default=OK)


def diagnose_link(link: LinkObservation, port: int | None) -> list[Finding]:
    """What the observations of one link mean (pure)."""
    out: list[Finding] = []
    if link.priority == "never":
        return [Finding("link", OK, "priority never: Braid does not use it")]
    if link.state != "up":
        return [Finding("link", ERROR, f"not usable: {link.state}")]
    if link.connectivity == "portal":
        text = (
            "sign-in required: a captive portal holds this link (NetworkManager's connectivity "
            "check); open any web page on that network to sign in. Braid uses it once it "
            "reaches the internet"
        )
        return [Finding("portal", WARNING, text)]
    if link.address is None:
        return [Finding("link", ERROR, "no address of the server's family (IPv4 or IPv6) on it")]
    where = f"port {port}" if port else "its port"
    # TCP, and MPTCP on the same connection
    if link.tcp == "ok":
        out.append(
            Finding("tcp", OK, f"TCP reaches the server's {where} ({link.connect_ms:.0f} ms)")
        )
        if link.mptcp is True:
            out.append(Finding("mptcp", OK, "MPTCP survives the path"))
        elif link.mptcp is False:
            out.append(
                Finding(
                    "mptcp",
                    ERROR,
                    "MPTCP does not survive the path: the connection fell back to plain TCP "
                    "(a middlebox on this network strips the MPTCP option), so this link "
                    "cannot add a subflow to Braid's connections",
                )
            )
    elif link.tcp is not None:
        why = {
            "refused": "the connection was refused",
            "timeout": f"no answer within {CONNECT_TIMEOUT:.0f} s",
            "unreachable": "no route",
        }.get(link.tcp, link.tcp_error or link.tcp)
        out.append(
            Finding(
                "tcp",
                ERROR,
                f"TCP does not reach the server's {where} through it ({why}): check the "
                "server's firewall for TCP and this network's",
            )
        )
    if link.join is True:
        out.append(Finding("join", OK, "a subflow through it joins a connection (MP_JOIN)"))
    elif link.join is False:
        out.append(
            Finding(
                "join",
                ERROR,
                (
                    f"a subflow through it could not join a connection within {JOIN_WAIT:.1f} s "
                    "(MP_JOIN lost or refused on the path): it cannot add to Braid's connections"
                    if link.join_error is None
                    else f"braidd could not open a test subflow through it: {link.join_error}"
                ),
            )
        )
    # UDP, from the health probes
    if not link.probed:
        out.append(Finding("udp", WARNING, "not probed (Braid is not connected): UDP not checked"))
    elif link.udp_alive is True:
        out.append(Finding("udp", OK, f"UDP reaches the server's {where} (probes answered)"))
    elif link.udp_alive is False:
        if link.tcp == "ok":
            text = (
                f"UDP to the server's {where} is blocked on this network (no probe answered) "
                "while TCP gets through: Braid counts the link dead and does not use it; open "
                "UDP in the server's firewall, or use another network"
            )
        else:
            text = f"UDP to the server's {where} gets no answer through it (probes unanswered)"
        out.append(Finding("udp", ERROR, text))
    else:
        out.append(Finding("udp", WARNING, "no probe verdict yet: ask again in a second"))
    # Idle round trip, from the probes
    if link.rtt_ms is not None and link.udp_alive:
        loss = f", loss {link.loss * 100:.0f} %" if link.loss else ""
        jitter = f", jitter {link.jitter_ms:.1f} ms" if link.jitter_ms is not None else ""
        level = WARNING if (link.loss or 0) >= 0.1 else OK
        out.append(Finding("rtt", level, f"round trip {link.rtt_ms:.0f} ms{jitter}{loss}"))
    # Subflows in the tunnels spread over every link
    if link.spread_tunnels and link.udp_alive is not False:
        if link.subflows == 0:
            out.append(
                Finding(
                    "subflows",
                    ERROR,
                    f"no subflow in the {link.spread_tunnels} tunnel(s) spread over every link: "
                    "its joins fail (MP_JOIN lost or refused on the path)",
                )
            )
        else:
            out.append(
                Finding(
                    "subflows",
                    OK,
                    f"{link.subflows} subflow(s) in {link.spread_tunnels} spread tunnel(s)",
                )
            )
    # Reverse-path filter
    if link.rp_filter == 1 and not link.default_route:
        fix = f"sysctl -w net.ipv4.conf.{link.name}.rp_filter=2"
        if link.routed:
            text = (
                "strict reverse-path filter (rp_filter=1) on a link that is not the default "
                "route: the kernel drops what arrives on it unless the way back leaves by it; "
                "Braid's rule for its address gives that, but other programs using the link "
                f"(a VPN, say) may see their answers dropped; loose is safe: {fix}"
            )
            out.append(Finding("rp_filter", WARNING, text))
        else:
            text = (
                "strict reverse-path filter (rp_filter=1) on a link that is not the default "
                "route, and Braid's routing for it is not in place: the server's answers "
                f"arriving on it are dropped; use loose: {fix}"
            )
            out.append(Finding("rp_filter", ERROR, text))
    elif link.rp_filter is not None:
        name = {0: "off", 1: "strict", 2: "loose"}.get(link.rp_filter, str(link.rp_filter))
        out.append(Finding("rp_filter", OK, f"reverse-path filter {name}"))
    return out


def diagnose_endpoints(obs: Observations) -> list[Finding]:
    """Other programs' MPTCP endpoints: NetworkManager 1.40+ adds one for every device with a
    default route. Unused while braidd runs the userspace path manager; under the kernel's, the
    ones on a link's address are braidd's to own (it takes them over) and any left decide."""
    if obs.endpoints is None:
        return [
            Finding("endpoints", WARNING, "cannot read the MPTCP endpoints (ip mptcp endpoint)")
        ]
    links = {a: link.name for link in obs.links for a in link.addresses}
    out = []
    for endpoint in obs.endpoints:
        where = endpoint.get("device") or "any device"
        on = f" (link {links[endpoint['address']]})" if endpoint.get("address") in links else ""
        text = (
            f"MPTCP endpoint id {endpoint.get('id')} of another program: {endpoint.get('address')}"
            f" {endpoint.get('flags') or 'no flags'} dev {where}{on}"
        )
        if obs.userspace_pm:
            out.append(
                Finding(
                    "endpoints",
                    OK,
                    f"{text}; NetworkManager adds these: unused, braidd opens the subflows itself",
                )
            )
        else:
            out.append(
                Finding(
                    "endpoints",
                    WARNING,
                    f"{text}; the kernel's path manager opens subflows from it with these flags. "
                    "If NetworkManager added it: nmcli connection modify CONNECTION "
                    "connection.mptcp-flags disabled, then reconnect",
                )
            )
    return out


def diagnose_laptop(obs: Observations) -> list[Finding]:
    """The MPTCP limits and counters of braidd's namespace (pure)."""
    out: list[Finding] = []
    used = [
        link
        for link in obs.links
        if link.priority != "never" and link.state == "up" and link.address is not None
    ]
    if obs.limits is None:
        out.append(Finding("limits", WARNING, "cannot read the MPTCP limits (ip mptcp limits)"))
    else:
        subflows = obs.limits.get("subflows", 0)
        text = (
            f"MPTCP limits: subflows {subflows}, add_addr_accepted "
            f"{obs.limits.get('add_addr_accepted', 0)}"
        )
        if subflows < max(len(used) - 1, 1):
            out.append(
                Finding(
                    "limits",
                    ERROR,
                    f"{text}: too low for {len(used)} links; raise it: "
                    "ip mptcp limits set subflows 8",
                )
            )
        else:
            out.append(Finding("limits", OK, text))
    out += diagnose_endpoints(obs)
    counters = obs.counters
    if not counters:
        out.append(
            Finding("counters", WARNING, "cannot read the MPTCP counters (/proc/net/netstat)")
        )
        return out
    fallbacks = sum(counters.get(name, 0) for name in FALLBACK_COUNTERS)
    failures = sum(counters.get(name, 0) for name in JOIN_FAILURE_COUNTERS)
    sent, answered = counters.get("MPJoinSynTx", 0), counters.get("MPJoinSynAckRx", 0)
    summary = (
        f"MPTCP counters since {obs.counters_since}: "
        f"{counters.get('MPCapableSYNTX', 0)} connections tried, "
        f"{fallbacks} fell back to TCP; {sent} joins sent, {answered} accepted, "
        f"{failures} failed"
    )
    dropped = counters.get("NoDSSInWindow", 0)
    if dropped:
        # The kernel's own window accounting, not a path's fault: said, not warned about.
        summary += (
            f"; {dropped} incoming segments received and then dropped by this kernel as beyond "
            "the window it had announced (the holes they leave pause a download for at least a "
            "retransmission timeout each; see the README's Performance section)"
        )
    if fallbacks or failures or (sent and answered < sent):
        out.append(
            Finding(
                "counters",
                WARNING,
                f"{summary}: the option is lost or refused on some path (see the links)",
            )
        )
    else:
        out.append(Finding("counters", OK, summary))
    return out


def diagnose_server(obs: Observations) -> list[Finding]:
    """What the server said of itself: its MPTCP limits bind the laptop's links too (pure)."""
    if not obs.server or not obs.connected:
        return []
    if obs.server_info is None:
        return [
            Finding(
                "limits",
                WARNING,
                f"cannot read the server's MPTCP limits: {obs.server_info_error or 'no answer'}",
            )
        ]
    version = obs.server_info.get("version") or "?"
    limits = obs.server_info.get("mptcp_limits")
    if not isinstance(limits, dict):
        return [
            Finding(
                "limits",
                WARNING,
                f"braid-server {version} cannot read its own MPTCP limits (is MPTCP enabled "
                "there? sysctl net.mptcp.enabled)",
            )
        ]
    used = [
        link
        for link in obs.links
        if link.priority != "never" and link.state == "up" and link.address is not None
    ]
    subflows = int(limits.get("subflows", 0))
    text = (
        f"braid-server {version}, MPTCP limits: subflows {subflows}, add_addr_accepted "
        f"{int(limits.get('add_addr_accepted', 0))}"
    )
    if subflows < max(len(used) - 1, 1):
        return [
            Finding(
                "limits",
                ERROR,
                f"{text}: too low for {len(used)} links; on the server, as root: "
                "ip mptcp limits set subflows 8 (braid-server raises it when it starts as root)",
            )
        ]
    return [Finding("limits", OK, text)]


def _server_info(data: bytes) -> tuple[dict | None, str | None]:
    """The INFO answer, kept only as declared: ``{"version": str, "mptcp_limits": {"subflows":
    int, "add_addr_accepted": int} or None}``; anything else is a malformed answer (pure)."""
    import json

    try:
        info = json.loads(data)
    except Exception:  # ValueError, and RecursionError for deeply nested input
        return None, "the server's answer is not JSON"
    if not isinstance(info, dict) or not isinstance(info.get("version"), str):
        return None, "the server's answer is malformed"
    limits = info.get("mptcp_limits")
    kept: dict | None = None
    if limits is not None:
        if not isinstance(limits, dict):
            return None, "the server's answer is malformed"
        kept = {}
        for key in ("subflows", "add_addr_accepted"):
            value = limits.get(key, 0)
            if type(value) is not int or not 0 <= value <= 1 << 16:
                return None, "the server's answer is malformed"
            kept[key] = value
    return {"version": info["version"][:40], "mptcp_limits": kept}, None


async def ask_server_info(
    pairing, address: str, mark: int | None, timeout: float = CONNECT_TIMEOUT
) -> tuple[dict | None, str | None]:
    """The server's answer to Command.INFO, or (None, why not)."""
    from braid.protocol.address import Address
    from braid.protocol.session import DataReceived, SessionError, StreamEnded
    from braid.protocol.tunnel import Command, Reply
    from braid.tunnel_client import TunnelError, open_tunnel

    try:
        tunnel = await open_tunnel(pairing, timeout=timeout, addresses=[address], mark=mark)
    except TunnelError as exc:
        return None, str(exc)
    try:
        nowhere = Address("0.0.0.0", 0)
        tunnel.send_request(nowhere, Command.INFO)
        reply = await tunnel.read_reply(nowhere, timeout=timeout)
        if reply.code is Reply.COMMAND_NOT_SUPPORTED:
            return None, "the server is too old to say (upgrade braid-server there)"
        if reply.code is not Reply.SUCCEEDED:
            return None, f"the server refused: {reply.code.describe()}"
        data = b""
        async with asyncio.timeout(timeout):
            while True:
                chunk = await tunnel.reader.read(4096)
                if not chunk:
                    break
                events = tunnel.session.receive(chunk)
                data += b"".join(e.data for e in events if isinstance(e, DataReceived))
                if len(data) > 16384:
                    return None, "the server's answer is too long"
                if any(isinstance(e, StreamEnded) for e in events):
                    break
        return _server_info(data)
    except (TimeoutError, TunnelError, SessionError, OSError, ValueError) as exc:
        return None, str(exc) or type(exc).__name__
    finally:
        await tunnel.close(abort=True)


def diagnose(obs: Observations, port: int | None = None) -> dict:
    """The whole answer: findings per link and for the laptop, with the observations."""
    links = []
    for link in obs.links:
        findings = diagnose_link(link, port)
        links.append(
            {
                "name": link.name,
                "kind": link.kind,
                "level": worst(findings),
                "findings": [f.to_json() for f in findings],
            }
        )
    laptop = diagnose_laptop(obs)
    if not obs.server:
        laptop.insert(0, Finding("server", ERROR, "Braid is not paired with a server: braid up"))
    elif not obs.connected:
        laptop.insert(0, Finding("server", WARNING, f"not connected to {obs.server} now"))
    remote = diagnose_server(obs)
    levels = [entry["level"] for entry in links] + [f.level for f in laptop + remote]
    return {
        "server": obs.server,
        "level": max(levels, key=_RANK.__getitem__, default=OK),
        "links": links,
        "laptop": [f.to_json() for f in laptop],
        "server_checks": [f.to_json() for f in remote],
        "observations": obs.to_json(),
    }


# -- reading the system (blocking: run off the event loop) ------------------------------------


def connect(
    source: str,
    device: str,
    server: tuple[str, int],
    mark: int | None,
    timeout: float = CONNECT_TIMEOUT,
) -> socket.socket:
    """An MPTCP connection from ``source`` by ``device`` to ``server`` (raises OSError)."""
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_MPTCP)
    except OSError:
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.connect(server)
    except BaseException:
        sock.close()
        raise
    return sock


def connect_test(
    source: str,
    device: str,
    server: tuple[str, int],
    mark: int | None,
    timeout: float = CONNECT_TIMEOUT,
) -> dict:
    """Open an MPTCP connection from ``source`` by ``device`` to ``server`` and close it:
    whether it connected (tcp), how fast, and whether it is still MPTCP (no fallback)."""
    started = time.monotonic()
    try:
        sock = connect(source, device, server, mark, timeout)
        elapsed = (time.monotonic() - started) * 1000
        with sock:
            return {
                "tcp": "ok",
                "connect_ms": round(elapsed, 1),
                "mptcp": mptcp_info(sock) is not None,
            }
    except TimeoutError:
        return {"tcp": "timeout", "tcp_error": "no answer in time"}
    except ConnectionRefusedError:
        return {"tcp": "refused", "tcp_error": "connection refused"}
    except OSError as exc:
        kind = "unreachable" if exc.errno in (101, 113) else "error"
        return {"tcp": kind, "tcp_error": exc.strerror or str(exc)}


#: Counters that say how many there are now, not how many happened.
GAUGES = frozenset({"MPCurrEstab"})


def since(now: dict[str, int], baseline: dict[str, int] | None) -> dict[str, int]:
    """The counters counted from ``baseline`` on (gauges as they are) (pure)."""
    if not baseline:
        return dict(now)
    return {
        name: value if name in GAUGES else max(0, value - baseline.get(name, 0))
        for name, value in now.items()
    }


def read_counters(path: Path = Path("/proc/net/netstat")) -> dict[str, int]:
    """nstat's MPTcpExt* counters of this network namespace (empty if unreadable)."""
    with contextlib.suppress(OSError):
        return parse_netstat(path.read_text(), "MPTcpExt")
    return {}


def parse_netstat(text: str, group: str) -> dict[str, int]:
    """One group of /proc/net/netstat: a line of names, then a line of values (pure)."""
    lines = [line.split() for line in text.splitlines() if line.startswith(group + ":")]
    if len(lines) < 2:
        return {}
    names, values = lines[0][1:], lines[1][1:]
    out = {}
    for name, value in zip(names, values, strict=False):
        with contextlib.suppress(ValueError):
            out[name] = int(value)
    return out


def read_rp_filter(device: str, root: Path = Path("/proc/sys/net/ipv4/conf")) -> int | None:
    """The reverse-path filter in force on ``device``: the larger of ``all`` and its own."""
    values = []
    for name in ("all", device):
        with contextlib.suppress(OSError, ValueError):
            values.append(int((root / name / "rp_filter").read_text().strip()))
    return max(values) if values else None


def default_route_device(path: Path = Path("/proc/net/route")) -> str | None:
    """The device of the main table's IPv4 default route with the lowest metric."""
    best: tuple[int, str] | None = None
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) < 8 or fields[1] != "00000000" or fields[7] != "00000000":
                continue
            with contextlib.suppress(ValueError):
                metric = int(fields[6])
                if best is None or metric < best[0]:
                    best = (metric, fields[0])
    return best[1] if best else None


def read_limits() -> dict | None:
    """``ip mptcp limits`` of this namespace, by the path manager's netlink family."""
    try:
        from pyroute2 import MPTCP

        with MPTCP() as mptcp:
            (msg,) = mptcp.limits("show")
        return {
            "subflows": msg.get_attr("MPTCP_PM_ATTR_SUBFLOWS") or 0,
            "add_addr_accepted": msg.get_attr("MPTCP_PM_ATTR_RCV_ADD_ADDRS") or 0,
        }
    except Exception:
        return None


def read_endpoints(own: set[tuple[int, str]] = frozenset()) -> list[dict] | None:
    """The MPTCP endpoints of this namespace but braidd's own (``own``: id and address), with
    device names. An id in Braid's range is not enough: the kernel numbers other programs'
    endpoints upwards from the highest id in use."""
    try:
        from pyroute2 import MPTCP

        from braid.daemon.routing.policy import parse_endpoint

        with MPTCP() as mptcp:
            found = [parse_endpoint(msg) for msg in mptcp.endpoint("show")]
    except Exception:
        return None
    out = []
    for endpoint in found:
        if endpoint["id"] is None or (endpoint["id"], endpoint["address"]) in own:
            continue
        device = None
        if endpoint["ifindex"]:
            with contextlib.suppress(OSError):
                device = socket.if_indextoname(endpoint["ifindex"])
        out.append({**endpoint, "device": device})
    return out


def established_subflows(sock: socket.socket, family: int) -> set[str]:
    """The local addresses of the connection's subflows that are established (a subflow whose
    join is still under way is listed by the connection too, hence the sock_diag dump)."""
    from braid.daemon.routing import paths as pm
    from braid.daemon.stats.subflows import mptcp_subflows

    mine = {sub.local for sub in pm.subflows(sock)}
    try:
        up = {(local, port) for local, port, _, _ in mptcp_subflows(family)}
    except OSError:
        return set()
    return {address for address, port in mine if (address, port) in up}


async def join_test(
    r, links: list[LinkObservation], server: tuple[str, int], family: int, mark: int | None
) -> None:
    """Open one tunnel through the first link, ask for a subflow through every other link
    (braidd's path manager, as for its tunnels) and see which join within :data:`JOIN_WAIT`
    seconds."""
    from braid.daemon.routing import paths as pm

    base = next((seen for seen in links if seen.mptcp and seen.address), None)
    by_name = {path.name: path for path in r.path_links()}
    others = [
        seen
        for seen in links
        if seen is not base and seen.tcp == "ok" and seen.address and seen.name in by_name
    ]
    if base is None or not others or r.pairing is None:
        return
    from braid.tunnel_client import TunnelError, open_tunnel

    # A join needs a connection that has carried data both ways: an authenticated tunnel has.
    try:
        tunnel = await open_tunnel(
            r.pairing,
            bind=(base.address, 0),
            family_hint=family,
            timeout=CONNECT_TIMEOUT,
            addresses=[server[0]],
            mark=mark,
        )
    except TunnelError:
        return
    sock = tunnel.sock
    try:
        token = pm.token(sock)
        if token is None:
            return
        asked = []
        for seen in others:
            path = by_name[seen.name]
            try:
                await r.platform.in_netlink(
                    r.platform.paths.create,
                    token,
                    seen.address,
                    path.local_id(family),
                    path.ifindex,
                    server,
                    False,
                )
            except Exception as exc:  # the path manager refused: the link cannot join here either
                seen.join = False
                seen.join_error = str(exc) or type(exc).__name__
                continue
            asked.append(seen)
        deadline = time.monotonic() + JOIN_WAIT
        while asked:
            joined = await asyncio.to_thread(established_subflows, sock, family)
            for seen in asked:
                if seen.address in joined:
                    seen.join = True
            asked = [seen for seen in asked if seen.join is None]
            if time.monotonic() > deadline:
                for seen in asked:
                    seen.join = False
                break
            await asyncio.sleep(0.05)
    finally:
        await tunnel.close()


async def bounded(coro, seconds: float, default):
    """``coro``'s result, or ``default`` if it takes longer than ``seconds``."""
    try:
        return await asyncio.wait_for(coro, seconds)
    except TimeoutError:
        return default


async def observe(r, mark: int | None, baseline: dict[str, int] | None = None) -> Observations:
    """Everything :func:`diagnose` needs, from the reconciler ``r`` and the system, within
    :data:`TIME_LIMIT` seconds (slow reads run off the event loop)."""
    from braid.daemon import policy
    from braid.daemon.routing import paths as pm

    started = time.monotonic()
    obs = Observations()
    pairing = r.pairing
    addresses = list(r.server_addresses)
    if pairing is not None:
        obs.server = pairing.server
    obs.connected = r.pool is not None and r.pool.connected
    server = (pm.plain_address(addresses[0]), pairing.port) if pairing and addresses else None
    family = socket.AF_INET6 if server and ":" in server[0] else socket.AF_INET
    default = await asyncio.to_thread(default_route_device)
    spread = [flow for flow in r.spreading.flows() if flow.spread and flow.open]
    subflows = await asyncio.to_thread(lambda: [pm.subflows(flow.sock) for flow in spread])
    locals_ = [sub.local[0] for subs in subflows for sub in subs]

    applied = r.platform.applied()
    links: list[LinkObservation] = []
    for link in r.ordered():
        priority = str(link.effective or link.priority)
        seen = LinkObservation(
            name=link.name,
            kind=link.kind,
            priority=priority,
            state=str(link.state),
            address=policy.source_address(link, family),
            default_route=link.name == default,
            routed=link.name in applied,
            rp_filter=await asyncio.to_thread(read_rp_filter, link.name),
            addresses=list(link.addresses),
            connectivity=link.connectivity,
        )
        if r.prober is not None:
            with contextlib.suppress(KeyError):
                health = r.prober.health(link.name)
                seen.probed = True
                seen.udp_alive = health.alive
                seen.rtt_ms = health.rtt_ms
                seen.jitter_ms = health.jitter_ms
                seen.loss = health.loss
        if priority != "never":
            seen.spread_tunnels = len(spread)
            seen.subflows = sum(1 for a in locals_ if a in link.addresses)
        links.append(seen)
    obs.links = links

    async def test(seen: LinkObservation) -> None:
        if server is None or seen.address is None or seen.priority == "never":
            return
        if seen.connectivity == "portal":
            return  # not routed: it could only time out
        result = await asyncio.to_thread(connect_test, seen.address, seen.name, server, mark)
        for key, value in result.items():
            setattr(seen, key, value)

    # The server's own account (its MPTCP limits), asked beside the links' tests.
    info = None
    if pairing is not None and addresses and obs.connected:
        info = asyncio.ensure_future(
            bounded(
                ask_server_info(pairing, pm.plain_address(addresses[0]), mark),
                CONNECT_TIMEOUT + 0.5,
                (None, "no answer in time"),
            )
        )
    left = max(0.5, TIME_LIMIT - (time.monotonic() - started))
    await bounded(asyncio.gather(*(test(seen) for seen in links)), min(left, 3.5), None)
    if server is not None and r.spreading.active:
        await bounded(join_test(r, links, server, family, mark), JOIN_WAIT + 1.0, None)
    obs.limits = await bounded(asyncio.to_thread(read_limits), 1.0, None)
    if info is not None:
        obs.server_info, obs.server_info_error = await info
    own = {
        (want.endpoint_id(family), addresses[0])
        for want in applied.values()
        for family, addresses in (
            (socket.AF_INET, want.addresses4),
            (socket.AF_INET6, want.addresses6),
        )
        if addresses
    }
    obs.endpoints = await bounded(asyncio.to_thread(read_endpoints, own), 1.0, None)
    obs.userspace_pm = bool(getattr(r.platform.paths, "active", False))
    obs.counters = since(await asyncio.to_thread(read_counters), baseline)
    obs.counters_since = "braidd started" if baseline else "boot"
    obs.elapsed_ms = round((time.monotonic() - started) * 1000, 1)
    return obs


__all__ = [
    "Finding",
    "LinkObservation",
    "Observations",
    "connect_test",
    "default_route_device",
    "diagnose",
    "diagnose_link",
    "observe",
    "parse_netstat",
    "read_counters",
    "read_endpoints",
    "read_limits",
    "read_rp_filter",
]
