"""What a UDP flow is and which links its datagrams take (pure: no sockets, no asyncio).

A flow is *real-time* when it is marked so (DSCP EF or AF4x), uses a STUN/TURN/WebRTC port, is
listed by the user, carries STUN messages (WebRTC's connectivity checks run on the call's own
addresses before its media, and keep running during it), or looks like a call: small datagrams
at a steady rate. It turns *bulk* when its rate grows past what a call sends; a bulk flow is
never duplicated (redundancy may cost at most twice the flow's own rate, and for bulk traffic
that would only steal capacity).

Each datagram goes on the usable link with the lowest current delay (probes and the datagram
path's own echoes, both measured under the load the link carries); a redundant flow goes on the
two best. A link becomes the best only when it is clearly better, so a flow does not flap
between two links of equal delay.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

REALTIME, BULK, OTHER = "realtime", "bulk", "other"
MODES = ("fastest", "redundant", "tunnel")

#: STUN/TURN (3478-3481, 5349-5350), Google Meet (19302-19309), Zoom (8801-8810).
REALTIME_PORTS = frozenset(
    {*range(3478, 3482), 5349, 5350, *range(19302, 19310), *range(8801, 8811)}
)
REALTIME_DSCP = frozenset({46, 34, 36, 38})  # EF, AF41, AF42, AF43

WINDOW_S = 1.0  # the meter's window
CALL_MAX_SIZE = 500  # bytes: voice is 60-250, small video frames stay under this mostly
CALL_MIN_RATE = 8  # datagrams per second
CALL_MAX_RATE = 120
BULK_BPS = 2_000_000  # a flow above this (bits/s, over the window) is bulk, never duplicated
SWITCH_MARGIN_MS = 3.0  # another link must be this much better (or 15 %) to become the best


STUN_COOKIE = b"\x21\x12\xa4\x42"  # RFC 5389's magic cookie
STUN_HEADER = 20


def is_stun(data: bytes) -> bool:
    """Whether a datagram is a STUN message (RFC 5389): its two first bits zero, the magic
    cookie, and a length that is the rest of the datagram, in 4-byte words."""
    if len(data) < STUN_HEADER or data[0] & 0xC0 or data[4:8] != STUN_COOKIE:
        return False
    length = int.from_bytes(data[2:4], "big")
    return length == len(data) - STUN_HEADER and length % 4 == 0


@dataclass
class FlowMeter:
    """Datagrams and bytes of one flow over the latest second."""

    def __post_init__(self) -> None:
        self._seen: collections.deque[tuple[float, int]] = collections.deque()
        self.bytes = 0

    def add(self, now: float, size: int) -> None:
        self._seen.append((now, size))
        self.bytes += size
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._seen and now - self._seen[0][0] > WINDOW_S:
            self.bytes -= self._seen.popleft()[1]

    def rate(self, now: float) -> tuple[float, float, float]:
        """(datagrams/s, bits/s, mean size) over the window."""
        self._trim(now)
        count = len(self._seen)
        if count == 0:
            return 0.0, 0.0, 0.0
        return count / WINDOW_S, self.bytes * 8 / WINDOW_S, self.bytes / count


def classify(
    port: int, dscp: int | None, listed: bool, meter: FlowMeter, now: float, was: str = OTHER
) -> str:
    """The flow's class now: ``realtime``, ``bulk`` or ``other``."""
    pps, bps, size = meter.rate(now)
    if bps > BULK_BPS:
        return BULK
    if listed or port in REALTIME_PORTS or (dscp is not None and dscp in REALTIME_DSCP):
        return REALTIME
    if CALL_MIN_RATE <= pps <= CALL_MAX_RATE and size <= CALL_MAX_SIZE:
        return REALTIME
    if was == REALTIME and pps < CALL_MIN_RATE:
        return REALTIME  # a pause in speech is not the end of a call
    return OTHER


@dataclass(frozen=True)
class LinkView:
    """One link as path choice sees it."""

    name: str
    number: int
    delay_ms: float | None  # the current delay (None: unknown yet)
    usable: bool  # the server's datagrams come back on it, and it is not suspect
    backup: bool = False
    mtu: int = 1500  # the largest packet that may leave on it


def choose_links(
    links: list[LinkView], copies: int, size: int, previous: tuple[str, ...] = ()
) -> tuple[str, ...]:
    """The links for one datagram of ``size`` bytes (sealed), best first; () means the tunnel.

    Backup links are used only when no other link is usable. A datagram larger than a link's
    MTU never goes on it (it would be fragmented or dropped).
    """
    fits = [link for link in links if link.usable and size <= link.mtu]
    primary = [link for link in fits if not link.backup] or fits
    if not primary:
        return ()

    def delay(link: LinkView) -> float:
        return link.delay_ms if link.delay_ms is not None else 1e9

    ranked = sorted(primary, key=lambda link: (delay(link), link.number))
    if previous:
        kept = next((link for link in ranked if link.name == previous[0]), None)
        if kept is not None and kept is not ranked[0]:
            best = delay(ranked[0])
            if delay(kept) - best <= max(SWITCH_MARGIN_MS, 0.15 * best):
                ranked.remove(kept)
                ranked.insert(0, kept)
    return tuple(link.name for link in ranked[:copies])


__all__ = [
    "BULK",
    "MODES",
    "OTHER",
    "REALTIME",
    "FlowMeter",
    "LinkView",
    "choose_links",
    "classify",
    "is_stun",
]
