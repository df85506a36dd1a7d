"""braid-server's health-probe responder: an authenticated UDP echo on the listening port.

braidd probes the server over each link several times a second to notice within
a second that a link silently stopped forwarding. A UDP echo on the internet
must never become a reflector, so this one

* answers only requests carrying a valid MAC under one of the devices' token
  hashes, with a reply of exactly the request's size (no amplification);
* answers only requests sent within 30 s of its own clock, and none twice: it
  remembers those it answered for as long, so a replayed capture gets nothing,
  however many probes came since; and never a source port below 1024 (no
  bouncing into other UDP services);
* limits replies per source (per /64 for IPv6) and in total, and drops
  everything else silently, counting it.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

from braid.protocol import probe
from braid.protocol.probe import ProbeType
from braid.server.admission import source_key
from braid.server.policy import normalise
from braid.server.state import format_hostport

log = logging.getLogger(__name__)

PER_SOURCE_RATE = 50.0  # replies per second; a laptop with 4 links sends 20
PER_SOURCE_BURST = 100.0
GLOBAL_RATE = 5000.0  # 50-byte replies: at most about 2 Mbit/s in all
GLOBAL_BURST = 500.0
LOG_RATE = 1.0  # warnings about wrong-key probes, across all sources
LOG_BURST = 5.0
MAX_SOURCES = 4096
# MACs of the requests answered in the last 2 * WINDOW_MS: far more than the probes of
# a household's devices in that time; when full, nothing more is answered until
# the oldest expire (forgetting one early would let its capture be replayed).
REPLAY_MEMORY = 65536


class TokenBucket:
    """``rate`` per second, up to ``burst`` at once."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = burst, now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


@dataclass
class ProbeStats:
    answered: int = 0
    rate_limited: int = 0
    wrong_key: int = 0  # the right shape but not authentic: a stale token, or a forgery
    malformed: int = 0  # not a probe request at all
    replayed: int = 0
    stale: int = 0  # sent more than 30 s before or after the server's clock
    bad_source: int = 0  # a source port below 1024

    def dropped(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self)) - self.answered

    def summary(self) -> str:
        return ", ".join(
            f"{getattr(self, f.name)} {f.name.replace('_', ' ')}" for f in fields(self)
        )


class ProbeResponder(asyncio.DatagramProtocol):
    """Answers authentic probe requests; drops (and counts) everything else."""

    def __init__(
        self,
        token_hashes: Callable[[], list[str]],
        *,
        warn: Callable[[str, str], object] | None = None,
        per_source_rate: float = PER_SOURCE_RATE,
        per_source_burst: float = PER_SOURCE_BURST,
        global_rate: float = GLOBAL_RATE,
        global_burst: float = GLOBAL_BURST,
        max_sources: int = MAX_SOURCES,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = probe.now_ms,
    ) -> None:
        # Asked per datagram, so that a removed device's key stops working at once.
        self._token_hashes = token_hashes
        self._hashes: list[str] = []
        self._keys: list[bytes] = []
        self._wall_ms = wall_ms
        self._warn = warn
        self._clock = clock
        self._source_rate, self._source_burst = per_source_rate, per_source_burst
        self._max_sources = max_sources
        now = clock()
        self._global = TokenBucket(global_rate, global_burst, now)
        self._log_bucket = TokenBucket(LOG_RATE, LOG_BURST, now)
        self._sources: dict[str, TokenBucket] = {}
        self._seen: set[bytes] = set()
        self._seen_order: collections.deque[tuple[int, bytes]] = collections.deque()
        self.stats = ProbeStats()
        self.transport: asyncio.DatagramTransport | None = None
        # The datagram path shares this port: it takes what is its own (braid.server.datagram).
        self.other: Callable[[bytes, tuple], bool] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def error_received(self, exc: Exception) -> None:
        # ICMP errors about earlier replies (port unreachable ...): nothing to do.
        log.debug("probe socket: %s", exc)

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if self.other is not None and self.other(data, addr):
            return
        if not probe.looks_like_probe(data):
            self.stats.malformed += 1
            return
        # One HMAC per device (at most MAX_DEVICES): no identifier in the clear tells
        # which, so an observer cannot follow a device from network to network.
        request, key = None, b""
        for key in self._current_keys():
            request = probe.parse(key, data)
            if request is not None:
                break
        if request is None:
            self.stats.wrong_key += 1
            self._log_wrong_key(addr)
            return
        if request.type != ProbeType.REQUEST:
            self.stats.malformed += 1  # a reply sent back at us: never answer it (no loops)
            return
        if addr[1] < 1024:
            self.stats.bad_source += 1
            return
        wall = self._wall_ms()
        self._expire(wall)
        if not probe.is_fresh(request, wall):
            self.stats.stale += 1
            return
        mac = data[-16:]
        if mac in self._seen:
            self.stats.replayed += 1
            return
        now = self._clock()
        if len(self._seen) >= REPLAY_MEMORY or not self._allow(source_key(addr[0]), now):
            self.stats.rate_limited += 1
            return
        self._remember(mac, wall)
        if self.transport is not None:
            self.transport.sendto(probe.encode_reply(key, request), addr)
            self.stats.answered += 1

    def _current_keys(self) -> list[bytes]:
        current = self._token_hashes()
        if current != self._hashes:
            self._hashes, self._keys = list(current), [probe.key_from_hash(h) for h in current]
        return self._keys

    def _allow(self, source: str, now: float) -> bool:
        bucket = self._sources.get(source)
        if bucket is None:
            if len(self._sources) >= self._max_sources:
                self._forget_idle(now)
                if len(self._sources) >= self._max_sources:
                    return False
            bucket = self._sources[source] = TokenBucket(self._source_rate, self._source_burst, now)
        # Per source first: one noisy source must not use up the global allowance.
        return bucket.take(now) and self._global.take(now)

    def _forget_idle(self, now: float) -> None:
        for source, bucket in list(self._sources.items()):
            if bucket.full(now):
                del self._sources[source]

    def _remember(self, mac: bytes, wall: int) -> None:
        self._seen.add(mac)
        self._seen_order.append((wall, mac))

    def _expire(self, wall: int) -> None:
        """Forget requests that could no longer pass the time check anyway.

        A request answered at ``t`` was sent within WINDOW_MS of ``t``, and is
        refused as stale from ``t + 2 * WINDOW_MS`` on, whatever the clocks did.
        """
        order = self._seen_order
        while order and wall - order[0][0] > 2 * probe.WINDOW_MS:
            self._seen.discard(order.popleft()[1])

    def _log_wrong_key(self, addr: tuple) -> None:
        # Spoofed sources could each earn a line of their own: cap the total too.
        if self._warn is None or not self._log_bucket.take(self._clock()):
            return
        label = format_hostport(str(normalise(addr[0])), addr[1])
        self._warn(
            addr[0],
            f"ignored a health probe from {label} with a wrong key "
            "(a device that was removed, or whose token was replaced, must pair again)",
        )

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        log.info("probes: %s", self.stats.summary())


def open_probe_socket(host: str, port: int) -> socket.socket:
    """A non-blocking UDP socket on the TCP listener's address (dual-stack on ``::``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 clients too
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def start_probe_responder(
    host: str,
    port: int,
    token_hashes: Callable[[], list[str]],
    warn: Callable[[str, str], object] | None = None,
) -> ProbeResponder | None:
    """The responder on udp host:port, or None (after a warning) if the port cannot be had.

    Without it the server still relays; clients just cannot tell a silently
    broken link quickly, so this is no reason to refuse to run.
    """
    where = format_hostport(host, port)
    try:
        sock = open_probe_socket(host, port)
    except OSError as exc:
        reason = {
            errno.EADDRINUSE: "the port is already in use",
            errno.EACCES: "permission denied",
        }.get(exc.errno or 0, exc.strerror or str(exc))
        log.warning(
            "cannot answer health probes on udp %s: %s; running without them "
            "(clients will be slower to notice a link that silently stopped working)",
            where,
            reason,
        )
        return None
    responder = ProbeResponder(token_hashes, warn=warn)
    await asyncio.get_running_loop().create_datagram_endpoint(lambda: responder, sock=sock)
    log.info("answering health probes on udp %s", where)
    return responder


__all__ = [
    "ProbeResponder",
    "ProbeStats",
    "TokenBucket",
    "open_probe_socket",
    "source_key",
    "start_probe_responder",
]
