"""The objects of braidd's control API, declared once (docs/control-api.md describes them).

braidd builds them (``Link.to_json``, ``Daemon.status``), the command line and the tray read
them, and the tray's tests serve them from a stand-in braidd; tests check all of these against
the declarations here. The events are declared in :mod:`braid.protocol.events`, the settings
in :mod:`braid.daemon.settings` (with their schema sent by ``get-settings``).
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict, get_type_hints

LinkStateName = Literal["up", "no-address", "down", "missing"]
PriorityName = Literal["always", "backup", "never"]
DaemonState = Literal["disconnected", "connecting", "connected", "degraded"]
CaptureInForce = Literal["off", "tunnel", "blocked", "direct"]
#: NetworkManager's connectivity check through a link; "portal": sign-in required.
ConnectivityName = Literal["none", "portal", "limited", "full"]


class LinkObject(TypedDict):
    name: str
    kind: str
    priority: PriorityName
    effective_priority: PriorityName
    order: int
    added: bool  # the user made it a link (braid links add)
    state: LinkStateName
    alive: bool | None  # the health probes' verdict; null when not probed
    carrying: bool  # its MPTCP endpoint is in place
    subflows: int  # subflows of braidd's tunnels leaving from its addresses
    addresses: list[str]
    rx_bps: int
    tx_bps: int
    rx_bytes: int
    tx_bytes: int
    metered: bool
    cap: dict[str, Any] | None
    used_bytes: int
    capped: bool
    rtt_ms: float | None
    jitter_ms: float | None
    loss: float | None
    # NetworkManager's connectivity check through it; null without NetworkManager or a check.
    # "portal": a captive portal wants the user to sign in; the link carries nothing until then
    # and is not reported as failed.
    connectivity: ConnectivityName | None


class CaptureObject(TypedDict):
    active: bool
    in_force: CaptureInForce
    when_server_unreachable: str
    prefer_tcp_for_web: bool
    udp_sessions: int
    dns_queries: int
    dns_failures: int


class PathsObject(TypedDict):
    per_flow: bool  # braidd manages each connection's subflows (the userspace path manager)
    flows: int
    spread: int
    joins: int


class TunnelObject(TypedDict):
    pool_ready: int
    flows_active: int
    flows_total: int
    flows_failed: int
    bytes_up: int
    bytes_down: int
    rx_bps: float
    tx_bps: float
    paths: PathsObject


# "class" is a keyword, hence the functional form. class: realtime, bulk or other (it picks the
# mode from the settings udp_realtime and udp_other); path: datagram (sealed datagrams over the
# links listed) or tunnel (frames inside a tunnel connection).
DatagramFlowObject = TypedDict(
    "DatagramFlowObject",
    {
        "client": str,
        "destination": str,
        "class": str,
        "mode": str,
        "path": Literal["datagram", "tunnel"],
        "links": list[str],
        "datagrams_up": int,
        "datagrams_down": int,
        "via_tunnel": int,
    },
)


class DatagramObject(TypedDict):
    session: bool  # a datagram session with the server is open
    error: str | None
    links: list[dict[str, Any]]  # name, usable, delay_ms, mtu, sent, received
    flows: list[DatagramFlowObject]
    sent: int
    copies: int
    received: int
    duplicates: int
    replayed: int
    forged: int
    too_large: int
    sessions: int
    held: dict[str, int]  # links whose tunnel downloads are held for calls: bits/s they may carry


class StatusObject(TypedDict, total=False):
    state: DaemonState
    t: float
    server: str | None
    fingerprint: str | None
    error: str | None
    connected_since: float | None
    socks: str
    best_link: str | None
    mode: str
    capture: CaptureObject
    links: list[LinkObject]
    tunnel: TunnelObject
    datagram: DatagramObject
    events: list[dict[str, Any]]  # not in samples
    problems: list[str]  # not in samples


#: The keys a sample (``status`` with ``brief``) leaves out.
FULL_ONLY = frozenset({"events", "problems"})


def keys(declared: type) -> set[str]:
    return set(get_type_hints(declared))


def problems(status: dict[str, Any], brief: bool = False) -> list[str]:
    """How ``status`` differs from the declarations (an empty list when it conforms)."""
    out = []
    want = keys(StatusObject) - (FULL_ONLY if brief else set())
    if set(status) != want:
        out.append(f"status keys differ: {sorted(set(status) ^ want)}")
    for part, declared in (("capture", CaptureObject), ("tunnel", TunnelObject)):
        if isinstance(status.get(part), dict) and set(status[part]) != keys(declared):
            out.append(f"{part} keys differ: {sorted(set(status[part]) ^ keys(declared))}")
    datagram = status.get("datagram")
    if isinstance(datagram, dict) and set(datagram) != keys(DatagramObject):
        out.append(f"datagram keys differ: {sorted(set(datagram) ^ keys(DatagramObject))}")
    flow_keys = keys(DatagramFlowObject)
    for flow in (datagram or {}).get("flows") or []:
        if set(flow) != flow_keys:
            out.append(f"datagram flow keys differ: {sorted(set(flow) ^ flow_keys)}")
    paths = (status.get("tunnel") or {}).get("paths")
    if isinstance(paths, dict) and set(paths) != keys(PathsObject):
        out.append(f"paths keys differ: {sorted(set(paths) ^ keys(PathsObject))}")
    for link in status.get("links") or []:
        if set(link) != keys(LinkObject):
            out.append(
                f"link {link.get('name')} keys differ: {sorted(set(link) ^ keys(LinkObject))}"
            )
    return out


__all__ = [
    "CaptureObject",
    "DatagramFlowObject",
    "DatagramObject",
    "LinkObject",
    "PathsObject",
    "StatusObject",
    "TunnelObject",
    "keys",
    "problems",
]
