"""Link health: a probe per link to braid-server every 200 ms, and a verdict per link.

The kernel cannot tell that a link silently stopped forwarding (its ISP
blackholes it while the interface stays up): MPTCP then stalls for a second or
more. Each link gets its own UDP socket, bound to the link's address and device
so the probe really leaves by that link, and sends an authenticated echo request
(:mod:`braid.protocol.probe`) to the server. A link whose replies stop for
``dead_after`` plus its round-trip time (never more than ``MAX_SILENCE``) is
declared dead, in time for the daemon to act within a second; sooner, in about
0.4 s, when a probe is overdue, the urgent probes it sends go unanswered too and
nothing else arrives on the link either (see ``URGENT_COUNT``); ``alive_after``
consecutive replies make it alive again. The replies also give the RTT, jitter
and loss shown per link.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import ipaddress
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from braid.aio import cancel_all, spawn
from braid.protocol import probe
from braid.protocol.probe import ProbeType

log = logging.getLogger(__name__)

#: Longest silence before a link is declared dead, whatever its RTT: the daemon must act
#: within 1 s of the failure, and the checker adds up to ``CHECK_INTERVAL`` to this.
MAX_SILENCE = 0.85
CHECK_INTERVAL = 0.05
#: A checker that ran this late means the event loop itself stalled (not the links): the
#: probes it could not send are not the links' fault, so their silence starts over.
STALL = 0.3
#: Loss is counted over this many probes; a probe counts as lost once unanswered this long
#: (or three smoothed RTTs, if that is longer).
LOSS_WINDOW = 20
LOSS_TIMEOUT = 1.0
#: A probe unanswered past its link's usual round trip (smoothed RTT + 4 deviations + this
#: margin) is overdue: ``URGENT_COUNT`` more probes go out at once, at least ``URGENT_SPACING``
#: apart (the checker runs every ``CHECK_INTERVAL``), and when none of them is answered either
#: within the same time, the link has been silent for ``FAST_SILENCE`` *and nothing else has
#: arrived on its interface meanwhile* (at most ``RX_QUIET`` packets), it is dead: a blackholed
#: link is known in about 0.4 s instead of 0.6 s plus its RTT. A link whose replies are only
#: late (a queue filling under a download, a Wi-Fi scan) still receives its traffic, so it is
#: judged by ``dead_after`` as before; an idle one must lose four probes in a row.
URGENT_MARGIN = 0.03
URGENT_COUNT = 3
URGENT_SPACING = 0.05
FAST_SILENCE = 0.3
RX_QUIET = 2
SEQ_MASK = 0xFFFFFFFF


@dataclass
class LinkHealth:
    alive: bool | None = None  # None until the first verdict
    rtt_ms: float | None = None  # smoothed (EWMA 1/8, like TCP's srtt)
    jitter_ms: float | None = None  # mean deviation (EWMA 1/4); None until the second reply
    loss: float = 0.0  # fraction of the last LOSS_WINDOW probes that went unanswered
    last_reply: float | None = None  # time.monotonic() of the latest reply

    def to_json(self) -> dict:
        since = None if self.last_reply is None else time.monotonic() - self.last_reply
        return {
            "alive": self.alive,
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 1),
            "jitter_ms": None if self.jitter_ms is None else round(self.jitter_ms, 1),
            "loss": round(self.loss, 3),
            "since_reply_s": None if since is None else round(since, 2),
        }


class _Link:
    """A probed link: its socket, its probes in flight and its health."""

    def __init__(self, name: str, device: str, source: str, number: int, now: float) -> None:
        self.name = name
        self.device = device
        self.source = source
        self.number = number  # the probe's link byte
        self.since = now  # the silence clock starts here until the first reply
        self.sock: socket.socket | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.seq = random.getrandbits(32)
        self.in_flight: dict[int, tuple[float, bytes]] = {}  # seq -> (sent at, nonce)
        self.results: collections.deque[bool] = collections.deque(maxlen=LOSS_WINDOW)
        self.last_answered: int | None = None  # seq of the latest reply
        self.in_a_row = 0  # replies to consecutive probes
        self.open_error: str | None = None  # logged once until it changes
        self.urgent = 0  # probes sent at once since the last reply, because one was overdue
        self.urgent_at = 0.0  # when the latest of them went out
        self.answered_sent = 0.0  # when the latest answered probe went out
        self.rx_at_urgent: int | None = None  # the interface's packets in, at the first urgent
        self.health = LinkHealth()


class Prober:
    """Probes every link to the server and tells ``on_change(name, alive)`` about verdicts.

    ``server`` is an address, not a name (the daemon resolves it once); each link's
    ``source`` must be of the same family. Everything runs on the event loop.
    """

    def __init__(
        self,
        key: bytes,
        server: tuple[str, int],
        on_change: Callable[[str, bool], None],
        interval: float = 0.2,
        dead_after: float = 0.6,
        alive_after: int = 2,
        mark: int | None = None,
        rx_packets: Callable[[str], int | None] | None = None,
    ) -> None:
        ip = ipaddress.ip_address(server[0])  # ValueError for a name
        #: Packets received on a device so far (None: unknown); the tests pass their own.
        self._rx_packets = rx_packets or read_rx_packets
        self._key = key
        self._server_ip = ip
        self._server = (str(ip), server[1])
        self._family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        self._on_change = on_change
        self._mark = mark  # SO_MARK on the probe sockets: system-wide capture lets them pass
        self.interval = interval
        self.dead_after = dead_after
        self.alive_after = alive_after
        self._links: dict[str, _Link] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._checker: asyncio.Task | None = None
        self._checked = 0.0  # when the checker last ran

    # --- links ---------------------------------------------------------------------------------

    def set_link(self, name: str, device: str, source: str) -> None:
        """Probe ``name`` from ``source`` via ``device``; a change of either means a new socket."""
        link = self._links.get(name)
        if link is not None:
            if (link.device, link.source) == (device, source):
                return
            self._close(link)
            link.device, link.source, link.open_error = device, source, None
            # Another path: its round trip is not the old one's.
            link.health.rtt_ms = link.health.jitter_ms = None
            link.urgent, link.rx_at_urgent = 0, None
        else:
            used = {other.number for other in self._links.values()}
            number = next((n for n in range(256) if n not in used), None)
            if number is None:
                raise ValueError("at most 256 links can be probed")
            link = self._links[name] = _Link(name, device, source, number, self._now())
        if self._loop is not None:
            self._open(link)
            link.timer = self._loop.call_soon(self._send, link)

    def remove_link(self, name: str) -> None:
        link = self._links.pop(name, None)
        if link is not None:
            self._close(link)

    def health(self, name: str) -> LinkHealth:
        """A copy of ``name``'s health now (KeyError for a link not probed)."""
        return dataclasses.replace(self._links[name].health)

    # --- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        now = self._now()
        for link in self._links.values():
            link.since = now
            self._open(link)
            link.timer = self._loop.call_soon(self._send, link)
        self._checker = spawn(self._check_loop(), "link health")

    async def stop(self) -> None:
        if self._checker is not None:
            await cancel_all([self._checker])
            self._checker = None
        for link in self._links.values():
            self._close(link)
        self._loop = None

    # --- sockets -------------------------------------------------------------------------------

    def _now(self) -> float:
        return self._loop.time() if self._loop is not None else time.monotonic()

    def _open(self, link: _Link) -> bool:
        """Open ``link``'s socket; on failure (no such address or device yet) log it once."""
        assert self._loop is not None
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if self._mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self._mark)
            if link.device:
                # Leave by this link's device (and its routes), whatever the main table prefers.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, link.device.encode())
            sock.bind((link.source, 0))
        except OSError as exc:
            sock.close()
            error = exc.strerror or str(exc)
            if error != link.open_error:
                log.info("%s: cannot probe from %s: %s", link.name, link.source or "?", error)
                link.open_error = error
            return False
        link.open_error = None
        self._loop.add_reader(sock.fileno(), self._readable, link, sock)
        link.sock = sock
        return True

    def _close(self, link: _Link) -> None:
        if link.timer is not None:
            link.timer.cancel()
            link.timer = None
        if link.sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(link.sock.fileno())
            link.sock.close()
            link.sock = None
        link.in_flight.clear()  # their replies would reach the closed socket
        link.in_a_row = 0
        link.last_answered = None

    # --- probing -------------------------------------------------------------------------------

    def _send(self, link: _Link) -> None:
        assert self._loop is not None
        now = self._loop.time()
        # A little jitter, so the links' probes do not stay in lockstep with anything.
        delay = self.interval * random.uniform(0.9, 1.1)
        link.timer = self._loop.call_at(now + delay, self._send, link)
        self._probe(link, now)

    def _probe(self, link: _Link, now: float) -> None:
        seq, link.seq = link.seq, (link.seq + 1) & SEQ_MASK
        if link.sock is None and not self._open(link):
            link.results.append(False)  # the address is gone or the device missing: lost
            return
        assert link.sock is not None
        nonce = os.urandom(probe.NONCE_SIZE)
        data = probe.encode_request(self._key, link.number, seq, time.monotonic_ns(), nonce)
        try:
            link.sock.sendto(data, self._server)
        except OSError as exc:  # ENETUNREACH while the device is down, EADDRNOTAVAIL ...
            log.debug("%s: probe not sent: %s", link.name, exc.strerror or exc)
            link.results.append(False)
            return
        link.in_flight[seq] = (now, nonce)

    def _readable(self, link: _Link, sock: socket.socket) -> None:
        while True:
            try:
                data, addr = sock.recvfrom(256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("%s: %s", link.name, exc.strerror or exc)
                return
            if sock is not link.sock or addr[1] != self._server[1]:
                continue
            with contextlib.suppress(ValueError):
                if ipaddress.ip_address(addr[0].partition("%")[0]) != self._server_ip:
                    continue
            reply = probe.parse(self._key, data)
            if reply is None or reply.type != ProbeType.REPLY or reply.link != link.number:
                continue
            sent = link.in_flight.get(reply.seq)
            if sent is None or sent[1] != reply.nonce:
                continue  # late (already counted lost), duplicated or not ours
            del link.in_flight[reply.seq]
            link.answered_sent = max(link.answered_sent, sent[0])
            self._answered(link, reply.seq, (time.monotonic_ns() - reply.stamp) / 1e6)

    def _answered(self, link: _Link, seq: int, rtt_ms: float) -> None:
        assert self._loop is not None
        health = link.health
        if health.rtt_ms is None:
            health.rtt_ms = rtt_ms
        else:
            deviation = abs(rtt_ms - health.rtt_ms)
            health.jitter_ms = (
                deviation if health.jitter_ms is None else health.jitter_ms * 0.75 + deviation / 4
            )
            health.rtt_ms += (rtt_ms - health.rtt_ms) / 8
        health.last_reply = self._loop.time()
        link.urgent = 0
        link.results.append(True)
        health.loss = link.results.count(False) / len(link.results)
        follows = link.last_answered is not None and seq == (link.last_answered + 1) & SEQ_MASK
        link.in_a_row = link.in_a_row + 1 if follows else 1
        link.last_answered = seq
        if health.alive is not True and link.in_a_row >= self.alive_after:
            self._verdict(link, True)

    # --- verdicts ------------------------------------------------------------------------------

    def silence_limit(self, rtt_ms: float | None) -> float:
        """How long without a reply makes a link dead: ``dead_after`` + RTT, capped."""
        rtt = (rtt_ms or 0.0) / 1000
        return max(self.dead_after, min(self.dead_after + rtt, MAX_SILENCE))

    def overdue_after(self, health: LinkHealth) -> float | None:
        """How long a probe may go unanswered before it is overdue (None: no RTT known yet)."""
        if health.rtt_ms is None:
            return None
        return (health.rtt_ms + 4 * (health.jitter_ms or 0.0)) / 1000 + URGENT_MARGIN

    def _hurry(self, link: _Link, now: float, heard: float) -> bool:
        """Send the urgent probes an overdue one calls for; True once they say dead."""
        overdue_after = self.overdue_after(link.health)
        # Only probes sent after the latest answered one: an older one lost is a lost probe,
        # and the link has answered since.
        waiting = [sent for sent, _ in link.in_flight.values() if sent > link.answered_sent]
        if overdue_after is None or not waiting or now - min(waiting) <= overdue_after:
            return False
        if link.urgent < URGENT_COUNT:
            if now - link.urgent_at >= URGENT_SPACING:
                if link.urgent == 0:
                    link.rx_at_urgent = self._rx_packets(link.device) if link.device else None
                link.urgent += 1
                link.urgent_at = now
                self._probe(link, now)
            return False
        if now - link.urgent_at <= overdue_after or now - heard <= FAST_SILENCE:
            return False
        if link.rx_at_urgent is not None:
            rx = self._rx_packets(link.device)
            if rx is not None and rx - link.rx_at_urgent > RX_QUIET:
                return False  # its traffic still arrives: the replies are late, not lost
        return True

    async def _check_loop(self) -> None:
        self._checked = self._now()
        while True:
            await asyncio.sleep(CHECK_INTERVAL)
            self._check()

    def _check(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        stalled = now - self._checked > STALL
        if stalled:
            log.info("the event loop stalled for %.2f s", now - self._checked - CHECK_INTERVAL)
        self._checked = now
        for link in list(self._links.values()):
            if stalled:
                link.since = now
                link.urgent = 0
            if self._links.get(link.name) is not link:
                continue  # removed by an on_change callback
            health = link.health
            timeout = max(LOSS_TIMEOUT, 3 * (health.rtt_ms or 0.0) / 1000)
            for seq, (sent, _) in list(link.in_flight.items()):
                if now - sent > timeout:
                    del link.in_flight[seq]
                    link.results.append(False)
            if link.results:
                health.loss = link.results.count(False) / len(link.results)
            if health.alive is False:
                continue
            heard = max(link.since, health.last_reply or link.since)
            if self._hurry(link, now, heard) or now - heard > self.silence_limit(health.rtt_ms):
                self._verdict(link, False)

    def _verdict(self, link: _Link, alive: bool) -> None:
        link.health.alive = alive
        log.info("%s: %s", link.name, "working" if alive else "not working (no probe replies)")
        try:
            self._on_change(link.name, alive)
        except Exception:
            log.exception("%s: the health change handler failed", link.name)


def read_rx_packets(device: str, path: str = "/proc/net/dev") -> int | None:
    """Packets received on ``device`` so far, None if it cannot be read. /proc/net/dev is this
    process's network namespace (sysfs would be that of whoever mounted it)."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                name, sep, fields = line.partition(":")
                if sep and name.strip() == device:
                    return int(fields.split()[1])  # bytes, then packets
    except (OSError, ValueError, IndexError):
        return None
    return None


__all__ = ["LinkHealth", "Prober", "read_rx_packets"]
