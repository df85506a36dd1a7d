"""Which unauthenticated connections braid-server keeps while they handshake (no I/O here).

Before a client has shown its token, the server cannot tell it from an attacker
at the same address (a shared NAT, the same laptop, a device with a replaced
token). So nothing an unauthenticated peer does may make the server refuse or
delay anyone else: there is no per-address penalty. What hostile peers could
exhaust instead, descriptors and memory, is bounded here:

* a source with ``per_source`` handshakes or more loses its junk first: when
  another connection from it arrives, one of its handshakes that closed or sent
  something that is not TLS, or that has stayed silent for ``grace`` seconds, is
  dropped (the oldest first). A legitimate client sends its TLS ClientHello
  right behind its connection's last ACK, so what it opens is never junk, and a
  laptop opening hundreds of tunnels at once from one address is not held back;
* at most ``total`` handshakes in all: a new connection is always admitted and,
  when the server is full, the source holding the most loses one: first junk,
  then one that has sent nothing yet, then one that began TLS, the oldest first.
  An attacker on a client's own address is that source, and loses its own
  connections before the client's.

Each admitted handshake is a ``Pending``; ``admit`` returns the ones to drop and
the caller closes their sockets.
"""

from __future__ import annotations

import ipaddress
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

PER_SOURCE = 32
TOTAL = 1024
#: Seconds a connection may stay silent before it counts as junk. A client starting hundreds of
#: TLS handshakes at once on one event loop (braidd during a burst) sends some ClientHellos half
#: a second or more after its connection: 0.5 s dropped them.
GRACE = 2.0
SCAN = 16  # the oldest handshakes of a source looked at to choose one to drop

# What a connection has sent so far, in the order they are dropped.
CLOSED_OR_GARBAGE = 0
SILENT = 1
TLS = 2


def source_key(host: str) -> str:
    """What per-source limits count by: the IPv4 address, or the IPv6 /64.

    One IPv6 host usually owns a whole /64, so counting single addresses would
    let it (or a spoofer aiming at it) multiply its share.
    """
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(eq=False)
class Pending:
    """One unauthenticated connection: its source, arrival order and whether it has spoken."""

    source: str
    order: int
    since: float  # when it was admitted (monotonic seconds)
    drop: Callable[[], None] = field(repr=False)
    # What the unread bytes say (CLOSED_OR_GARBAGE, SILENT or TLS): a client's ClientHello
    # is often there before the server has looked, and must count when choosing whom to drop.
    peek: Callable[[], int] = field(repr=False, default=lambda: SILENT)
    spoke: bool = False  # it began a TLS handshake
    dropped: bool = False  # pushed out by a newer connection

    def standing(self) -> int:
        if not self.spoke:
            seen = self.peek()
            if seen == TLS:
                self.spoke = True
            return seen
        return TLS


class Admission:
    """The handshakes in progress, bounded per source and in total."""

    def __init__(
        self,
        per_source: int = PER_SOURCE,
        total: int = TOTAL,
        grace: float = GRACE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_source < 1 or total < per_source:
            raise ValueError("need 1 <= per_source <= total")
        self.per_source = per_source
        self.total = total
        self.grace = grace
        self._clock = clock
        # Per source, in arrival order (a dict keeps it): the oldest come first.
        self._by_source: dict[str, dict[Pending, None]] = {}
        self._count = 0
        self._order = itertools.count()
        self.dropped = 0  # handshakes pushed out since start

    def __len__(self) -> int:
        return self._count

    def sources(self) -> int:
        return len(self._by_source)

    def admit(
        self,
        host: str,
        drop: Callable[[], None],
        peek: Callable[[], int] = lambda: SILENT,
    ) -> tuple[Pending, list[Pending]]:
        """Admit a new connection from ``host``; returns it and the handshakes to drop.

        The dropped ones are already forgotten here; ``drop`` has been called for each.
        """
        source = source_key(host)
        now = self._clock()
        victims: list[Pending] = []
        mine = self._by_source.get(source)
        if mine is not None and len(mine) >= self.per_source:
            junk = self._junk(mine, now)
            if junk is not None:
                victims.append(junk)
        if not victims and self._count >= self.total:
            heaviest = max(self._by_source.values(), key=len)
            victims.append(self._pick(heaviest))
        for victim in victims:
            self._forget(victim)
            victim.dropped = True
            self.dropped += 1
            victim.drop()
        entry = Pending(source, next(self._order), now, drop, peek)
        self._by_source.setdefault(source, {})[entry] = None
        self._count += 1
        return entry, victims

    def release(self, entry: Pending) -> None:
        """The handshake ended (authenticated, refused or dropped); idempotent."""
        self._forget(entry)

    @staticmethod
    def _pick(entries: dict[Pending, None]) -> Pending:
        """The oldest of the lowest standing, among the oldest SCAN (each look is a syscall)."""
        return min(itertools.islice(entries, SCAN), key=lambda e: (e.standing(), e.order))

    def _junk(self, entries: dict[Pending, None], now: float) -> Pending | None:
        """The oldest that closed, sent garbage, or stayed silent past the grace, among the
        oldest SCAN; or None. (Junk that is newer has its own task close it soon.)"""
        best: tuple[int, int, Pending] | None = None
        for entry in itertools.islice(entries, SCAN):
            standing = entry.standing()
            if standing == TLS or (standing == SILENT and now - entry.since < self.grace):
                continue
            if best is None or (standing, entry.order) < best[:2]:
                best = (standing, entry.order, entry)
        return None if best is None else best[2]

    def _forget(self, entry: Pending) -> None:
        mine = self._by_source.get(entry.source)
        if mine is None or entry not in mine:
            return
        del mine[entry]
        self._count -= 1
        if not mine:
            del self._by_source[entry.source]


__all__ = [
    "CLOSED_OR_GARBAGE",
    "GRACE",
    "PER_SOURCE",
    "SILENT",
    "TLS",
    "TOTAL",
    "Admission",
    "Pending",
    "source_key",
]
