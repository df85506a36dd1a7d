"""braidd's end of the datagram path: UDP flows as sealed datagrams over each link's own UDP.

A tunnel connection asks the server for a session (Command.DATAGRAM) and stays open: it is the
session's life and its fallback. Each usable link gets a UDP socket bound to its address and
device (as the health probes do) and connected to the server's UDP port. Every datagram of a
flow goes on the link with the lowest current delay; a real-time flow goes on the two best and
the first copy wins at the server (and on the way back, here). Where UDP to the server does not
get through (no PONG on any link), or a datagram is too large for every link's path MTU, it goes
as a frame on the session's tunnel connection instead, to the same server socket, so the
destination sees one flow whatever path a datagram took.

A link's delay is the smoothed round trip of the stamps the server echoes on it, measured with
the traffic it carries (the health probes' RTT until there are such samples). A link that stops
answering while datagrams go out on it is suspect at once: a PING goes out on it when it has
been quiet for a round trip, and without an answer within two more it is skipped until it
answers again; the probes' verdict covers links that carry nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from braid.aio import cancel_all, spawn
from braid.daemon.tunnel import flowclass
from braid.daemon.tunnel.flowclass import BULK, REALTIME, FlowMeter, LinkView
from braid.protocol import datagram as dg
from braid.protocol.address import Address, encode_address
from braid.protocol.tunnel import FRAME_MAX, Command, Reply
from braid.tunnel_client import Tunnel, TunnelError

log = logging.getLogger(__name__)

TICK = 0.1
PING_EVERY = 1.0  # per link, confirmed: keeps the NAT binding and the delay of idle links
PING_UNCONFIRMED = 0.25
CONFIRMED_FOR = 3.0  # a link is usable this long after the server's last packet on it
DELAY_FRESH = 0.5  # the datagram path's own samples beat the probes' while this fresh
SUSPECT_MIN = 0.04  # s: a PING unanswered for 2 RTT plus this makes its link suspect
SESSION_PING = 20.0  # over the tunnel: keeps the session alive while UDP is blocked
RETRY_MIN, RETRY_MAX = 0.5, 15.0
OLD_SERVER_RETRY = 600.0  # a server that does not know Command.DATAGRAM: UDP by tunnels
#: A UDP flow idle this long is released, as its tunnel sessions are (BRAID_UDP_IDLE: tests).
FLOW_IDLE = float(os.environ.get("BRAID_UDP_IDLE", 60.0))
MAX_FLOWS = 4096
STATUS_FLOWS = 64
#: A real-time flow that sent within this many seconds still holds headroom on its links.
REALTIME_RECENT = 3.0
IP_MTU_DISCOVER, IP_PMTUDISC_DO, IP_MTU = 10, 2, 14
IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO, IPV6_MTU = 23, 2, 24

TakeTunnel = Callable[[], Awaitable[Tunnel]]
#: (name, source address, backup, probe health or None) per link.
LinksFn = Callable[[], list[tuple[str, str, bool, Any]]]
ServerFn = Callable[[], "tuple[str, int] | None"]


@dataclass
class _Link:
    name: str
    number: int
    source: str
    backup: bool = False
    sock: socket.socket | None = None
    mtu: int = 1400  # room for a sealed packet (the path MTU minus IP and UDP headers)
    heard: float | None = None  # loop time of the server's last authentic packet on it
    rtt_ms: float | None = None
    rtt_at: float = 0.0
    pinged: float = 0.0  # last PING sent
    urgent_ping: float | None = None  # a PING sent because the link went quiet under traffic
    probe: Any = None
    sent: int = 0
    received: int = 0

    def delay_ms(self, now: float) -> float | None:
        probe_rtt = getattr(self.probe, "rtt_ms", None)
        if self.rtt_ms is not None and (now - self.rtt_at < DELAY_FRESH or probe_rtt is None):
            return self.rtt_ms
        return probe_rtt if probe_rtt is not None else self.rtt_ms

    def suspect(self, now: float) -> bool:
        if self.urgent_ping is None:
            return False
        rtt = (self.rtt_ms or getattr(self.probe, "rtt_ms", None) or 50.0) / 1000
        return now - self.urgent_ping > 2 * rtt + SUSPECT_MIN

    def usable(self, now: float) -> bool:
        if self.sock is None or self.heard is None or now - self.heard > CONFIRMED_FOR:
            return False
        if getattr(self.probe, "alive", None) is False:
            return False
        return not self.suspect(now)


@dataclass
class Flow:
    """One UDP flow (client, destination), whichever path carries it."""

    id: int
    client: tuple
    destination: Address
    answer: Callable[[bytes], None]
    path: str  # "datagram" or "tunnel"
    mode: str
    listed: bool = False  # by the user, or it carried a STUN message: real-time unless bulk
    dscp: int | None = None
    klass: str = flowclass.OTHER
    links: tuple[str, ...] = ()
    meter: FlowMeter = field(default_factory=FlowMeter)
    last: float = 0.0
    up: int = 0
    down: int = 0
    via_tunnel: int = 0  # datagrams that went as frames on the session's tunnel

    def to_json(self) -> dict:
        return {
            "client": f"{self.client[0]}:{self.client[1]}",
            "destination": str(self.destination),
            "class": self.klass,
            "mode": self.mode,
            "path": "tunnel" if self.path == "tunnel" or not self.links else "datagram",
            "links": list(self.links),
            "datagrams_up": self.up,
            "datagrams_down": self.down,
            "via_tunnel": self.via_tunnel,
        }


@dataclass
class DatagramStats:
    sent: int = 0  # packets, copies counted
    copies: int = 0  # second copies of redundant datagrams
    received: int = 0
    duplicates: int = 0
    replayed: int = 0
    forged: int = 0
    too_large: int = 0  # datagrams no link's path MTU could take: sent by the tunnel
    sessions: int = 0


class DatagramPath:
    """The session, the per-link sockets and the flows that use them."""

    def __init__(
        self,
        take_tunnel: TakeTunnel,
        server: ServerFn,
        links: LinksFn,
        mark: int | None = None,
    ) -> None:
        self._take_tunnel = take_tunnel
        self._server_fn = server
        self._links_fn = links
        self._mark = mark
        #: Called when a flow turns real-time (braidd: a pass, which holds its link for it).
        self.on_realtime: Callable[[], None] = lambda: None
        self._server: tuple[str, int] | None = None
        self._tunnel: Tunnel | None = None
        self._sealer: dg.Sealer | None = None
        self._replay = dg.ReplayWindow()
        self._dedup = dg.ReplayWindow()
        self._links: dict[str, _Link] = {}
        self.flows: dict[int, Flow] = {}
        self._next_flow = 0
        self._number = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ticker: asyncio.Task | None = None
        self._reader: asyncio.Task | None = None
        self._opening: asyncio.Task | None = None
        self._retry_at = 0.0
        self._retry = RETRY_MIN
        self._session_pinged = 0.0
        self.stats = DatagramStats()
        self.error: str | None = None

    # -- life --------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._ticker = spawn(self._tick_loop(), name="datagram path")

    async def close(self) -> None:
        await cancel_all([t for t in (self._ticker, self._opening, self._reader) if t is not None])
        self._drop_session()
        for link in list(self._links.values()):
            self._close_link(link)
        self._links.clear()

    @property
    def ready(self) -> bool:
        return self._sealer is not None

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    async def _tick_loop(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:
                log.exception("datagram path tick failed")
            await asyncio.sleep(TICK)

    def tick(self) -> None:
        now = self._now()
        server = self._server_fn()
        if server != self._server:
            self._drop_session()
            for link in list(self._links.values()):
                self._close_link(link)
            self._links.clear()
            self._server = server
            self._retry_at, self._retry = 0.0, RETRY_MIN
        if server is None:
            return
        if self._sealer is None and self._opening is None and now >= self._retry_at:
            self._opening = spawn(self._open_session(), name="datagram session")
        if self._tunnel is not None and not self._tunnel.is_alive():
            self._drop_session()
        self._sync_links(now)
        if self._sealer is None:
            return
        for link in self._links.values():
            if link.sock is None:
                continue
            every = PING_EVERY if link.usable(now) else PING_UNCONFIRMED
            if now - link.pinged >= every:
                self._ping(link, now)
        if now - self._session_pinged > SESSION_PING and self._tunnel is not None:
            self._session_pinged = now
            packet = dg.Packet(dg.Kind.PING, dg.TUNNEL_LINK, 0, dg.stamp_us(time.monotonic_ns()))
            self._tunnel.queue_datagram(self._sealer.seal(packet))
        for flow in list(self.flows.values()):
            if now - flow.last > FLOW_IDLE:
                self.forget(flow)

    # -- the session -------------------------------------------------------------------

    async def _open_session(self) -> None:
        tunnel = None
        try:
            tunnel = await self._take_tunnel()
            reply = await tunnel.request(Address("0.0.0.0", 0), command=Command.DATAGRAM)
            if reply.code is Reply.COMMAND_NOT_SUPPORTED:
                self._retry = OLD_SERVER_RETRY  # a server from before the datagram path
            if reply.code is not Reply.SUCCEEDED:
                raise TunnelError(f"the server refused a datagram session: {reply.code.describe()}")
            grant = await asyncio.wait_for(tunnel.receive_datagram(), 10)
            unpacked = dg.unpack_grant(grant or b"")
            if unpacked is None:
                raise TunnelError("the server's datagram grant is malformed")
            session_id, key = unpacked
        except (
            TunnelError,
            ConnectionError,
            OSError,
            TimeoutError,
            asyncio.IncompleteReadError,
        ) as exc:
            self.error = str(exc) or type(exc).__name__
            log.info("no datagram session (UDP goes by the tunnel): %s", self.error)
            if tunnel is not None:
                await tunnel.close(abort=True)
            self._retry_at = self._now() + self._retry
            self._retry = max(self._retry, min(self._retry * 2, RETRY_MAX))
            return
        finally:
            self._opening = None
        self._tunnel = tunnel
        self._sealer = dg.Sealer(session_id, key, dg.UP)
        self._replay = dg.ReplayWindow()
        self._dedup = dg.ReplayWindow()
        self._retry = RETRY_MIN
        self.error = None
        self.stats.sessions += 1
        self._session_pinged = self._now()
        self._reader = spawn(self._read_tunnel(tunnel), name="datagram session frames")
        for link in self._links.values():
            link.heard = None
            link.urgent_ping = None
            if link.sock is not None:
                self._ping(link, self._now())
        log.info("datagram session %s open", session_id.hex())

    async def _read_tunnel(self, tunnel: Tunnel) -> None:
        try:
            while True:
                frame = await tunnel.receive_datagram()
                if frame is None:
                    break
                self._received(frame, None)
        except (TunnelError, ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
            log.info("datagram session ended: %s", exc)
        finally:
            if self._tunnel is tunnel:
                self._drop_session()

    def _drop_session(self) -> None:
        tunnel, self._tunnel = self._tunnel, None
        self._sealer = None
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
        self._reader = None
        if tunnel is not None:
            spawn(tunnel.close(abort=True), name="datagram session close")

    # -- links -------------------------------------------------------------------------

    def _sync_links(self, now: float) -> None:
        assert self._server is not None
        family = 6 if ":" in self._server[0] else 4
        want = {}
        for name, source, backup, health in self._links_fn():
            with contextlib.suppress(ValueError):
                if ipaddress.ip_address(source).version == family:
                    want[name] = (source, backup, health)
        for name in set(self._links) - set(want):
            self._close_link(self._links.pop(name))
        for name, (source, backup, health) in want.items():
            link = self._links.get(name)
            if link is not None and link.source != source:
                self._close_link(self._links.pop(name))
                link = None
            if link is None:
                used = {other.number for other in self._links.values()}
                number = next((n for n in range(dg.MAX_LINKS) if n not in used), None)
                if number is None:
                    continue  # more links than the down bit set holds: the rest stay on MPTCP
                link = self._links[name] = _Link(name, number, source)
            link.backup, link.probe = backup, health
            if link.sock is None and self._sealer is not None:
                self._open_link(link)

    def _open_link(self, link: _Link) -> None:
        assert self._server is not None and self._loop is not None
        v6 = ":" in self._server[0]
        sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if self._mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self._mark)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, link.name.encode())
            # Never fragment: a datagram too large for the path fails here and takes the tunnel.
            if v6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
            sock.bind((link.source, 0))
            sock.connect(self._server)
        except OSError as exc:
            sock.close()
            log.debug("%s: no datagram socket: %s", link.name, exc)
            return
        try:
            self._loop.add_reader(sock.fileno(), self._readable, link, sock)
        except RuntimeError as exc:
            # asyncio still holds a transport for this descriptor number (its socket was closed
            # under it): leave this link out for now rather than fail the caller; retried later.
            sock.close()
            log.debug("%s: no datagram socket for now: %s", link.name, exc)
            return
        link.sock = sock
        self._read_mtu(link)

    def _read_mtu(self, link: _Link) -> None:
        assert link.sock is not None
        v6 = link.sock.family == socket.AF_INET6
        with contextlib.suppress(OSError):
            if v6:
                mtu = link.sock.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU)
            else:
                mtu = link.sock.getsockopt(socket.IPPROTO_IP, IP_MTU)
            link.mtu = mtu - (48 if v6 else 28)

    def _close_link(self, link: _Link) -> None:
        if link.sock is not None:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(link.sock.fileno())
            link.sock.close()
            link.sock = None
        link.heard = None

    def _ping(self, link: _Link, now: float, urgent: bool = False) -> None:
        assert self._sealer is not None
        link.pinged = now
        if urgent:
            link.urgent_ping = now
        room = dg.ROOM.pack(max(0, min(link.mtu, 0xFFFF)))  # answers must fit the link too
        packet = dg.Packet(
            dg.Kind.PING, link.number, 0, dg.stamp_us(time.monotonic_ns()), payload=room
        )
        self._send_on(link, self._sealer.seal(packet))

    def _send_on(self, link: _Link, sealed: bytes) -> bool:
        if link.sock is None:
            return False
        try:
            link.sock.send(sealed)
        except OSError as exc:
            if exc.errno == 90:  # EMSGSIZE: the path MTU shrank; learn it
                self._read_mtu(link)
            log.debug("%s: datagram not sent: %s", link.name, exc.strerror or exc)
            return False
        link.sent += 1
        self.stats.sent += 1
        return True

    def views(self, now: float) -> list[LinkView]:
        return [
            LinkView(
                link.name, link.number, link.delay_ms(now), link.usable(now), link.backup, link.mtu
            )
            for link in self._links.values()
        ]

    # -- receiving ---------------------------------------------------------------------

    def _readable(self, link: _Link, sock: socket.socket) -> None:
        for _ in range(64):
            try:
                data = sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ICMP errors of earlier sends
                log.debug("%s: %s", link.name, exc.strerror or exc)
                continue
            if sock is not link.sock:
                return
            self._received(data, link)

    def _received(self, data: bytes, link: _Link | None) -> None:
        sealer = self._sealer
        if sealer is None:
            return
        opened = sealer.open(data)
        if opened is None:
            self.stats.forged += 1
            return
        seq, packet = opened
        if not self._replay.check(seq):
            self.stats.replayed += 1
            return
        self.stats.received += 1
        now = self._now()
        if link is not None:
            link.received += 1
            link.heard = now
            link.urgent_ping = None
            rtt = dg.round_trip_us(dg.stamp_us(time.monotonic_ns()), packet.echo, packet.hold)
            if rtt is not None:
                sample = rtt / 1000
                link.rtt_ms = (
                    sample if link.rtt_ms is None else link.rtt_ms + (sample - link.rtt_ms) / 4
                )
                link.rtt_at = now
        if packet.kind != dg.Kind.DATA:
            return
        if not self._dedup.check(packet.number):
            self.stats.duplicates += 1
            return
        flow = self.flows.get(packet.flow)
        if flow is not None:
            flow.down += 1
            flow.last = now
            flow.answer(packet.payload)

    # -- sending -----------------------------------------------------------------------

    def open_flow(self, client: tuple, destination: Address, answer, mode: str, listed: bool, dscp):
        self._next_flow = (self._next_flow + 1) & 0xFFFFFFFF or 1
        room = len(self.flows) < MAX_FLOWS  # beyond that, flows take tunnel connections
        path = "datagram" if self.ready and mode != "tunnel" and room else "tunnel"
        flow = Flow(self._next_flow, client, destination, answer, path, mode, listed, dscp)
        flow.last = self._now()
        if room:
            self.flows[flow.id] = flow
        return flow

    def send(self, flow: Flow, data: bytes, modes: dict[str, str]) -> bool:
        """Carry one datagram of ``flow``; False if the session is gone (use the tunnel)."""
        sealer = self._sealer
        if sealer is None:
            return False
        now = self._now()
        flow.meter.add(now, len(data))
        flow.last = now
        flow.up += 1
        self.classify(flow, now)
        mode = modes.get(flow.klass, "fastest")
        if mode != "tunnel":  # a flow keeps its path (the destination would see a new port)
            flow.mode = mode
        copies = 2 if mode == "redundant" and flow.klass != BULK else 1
        size = dg.OVERHEAD + len(encode_address(flow.destination)) + len(data)
        chosen = flowclass.choose_links(self.views(now), copies, size, flow.links)
        if not chosen and any(v.usable and v.mtu < size for v in self.views(now)):
            self.stats.too_large += 1
        flow.links = chosen
        self._number += 1
        stamp = dg.stamp_us(time.monotonic_ns())
        links = [self._links[name] for name in chosen]
        down = sum(1 << link.number for link in links)
        sent = False
        for i, link in enumerate(links):
            packet = dg.Packet(
                dg.Kind.DATA,
                link.number,
                down,
                stamp,
                0,
                0,
                flow.id,
                self._number,
                flow.destination,
                data,
            )
            if self._send_on(link, sealer.seal(packet)):
                sent = True
                if i:
                    self.stats.copies += 1
                quiet = now - (link.heard or 0.0)
                rtt = (link.delay_ms(now) or 50.0) / 1000
                if (
                    quiet > rtt + SUSPECT_MIN
                    and link.urgent_ping is None
                    and now - link.pinged > rtt
                ):
                    self._ping(link, now, urgent=True)
        if not sent:
            flow.links = ()
            packet = dg.Packet(
                dg.Kind.DATA,
                dg.TUNNEL_LINK,
                0,
                stamp,
                0,
                0,
                flow.id,
                self._number,
                flow.destination,
                data,
            )
            sealed = sealer.seal(packet)
            if self._tunnel is None or len(sealed) > FRAME_MAX:
                return True  # lost, as UDP may be
            flow.via_tunnel += 1
            self._tunnel.queue_datagram(sealed)
        return True

    def classify(self, flow: Flow, now: float) -> None:
        """Re-judge ``flow`` after a datagram; a flow turning real-time calls ``on_realtime``."""
        was = flow.klass
        flow.klass = flowclass.classify(
            flow.destination.port, flow.dscp, flow.listed, flow.meter, now, flow.klass
        )
        if flow.klass == REALTIME and was != REALTIME:
            self.on_realtime()  # a call began: its link may need headroom at once

    def realtime_links(self, tunnel_link: str | None, within: float = REALTIME_RECENT) -> set[str]:
        """The links real-time flows sent on within the last ``within`` seconds; a flow on the
        tunnel path counts as on ``tunnel_link`` (where its tunnel starts: the best link)."""
        if self._loop is None:
            return set()
        now = self._now()
        out: set[str] = set()
        for flow in self.flows.values():
            if flow.klass == REALTIME and now - flow.last < within:
                out.update(flow.links or ((tunnel_link,) if tunnel_link else ()))
        return out

    def forget(self, flow: Flow) -> None:
        """The flow is over: the server releases its socket at once (on the session's tunnel,
        which does not lose it), rather than after its idle timeout."""
        self.flows.pop(flow.id, None)
        if flow.path == "datagram" and self._sealer is not None and self._tunnel is not None:
            packet = dg.Packet(dg.Kind.CLOSE, dg.TUNNEL_LINK, flow=flow.id)
            self._tunnel.queue_datagram(self._sealer.seal(packet))

    # -- status ------------------------------------------------------------------------

    def status(self) -> dict:
        now = self._now() if self._loop is not None else 0.0
        return {
            "session": self.ready,
            "error": self.error,
            "links": [
                {
                    "name": link.name,
                    "usable": link.usable(now) if self._loop is not None else False,
                    "delay_ms": None
                    if link.delay_ms(now) is None
                    else round(link.delay_ms(now), 1),
                    "mtu": link.mtu,
                    "sent": link.sent,
                    "received": link.received,
                }
                for link in self._links.values()
            ],
            # The most recent flows only: the status stays small with thousands of flows.
            "flows": [flow.to_json() for flow in list(self.flows.values())[-STATUS_FLOWS:]],
            **{k: v for k, v in vars(self.stats).items()},
        }


def parse_ports(entries: list[str]) -> set[int]:
    """User-listed real-time ports: ``"5004"`` or ``"10000-20000"``; bad entries are skipped."""
    ports: set[int] = set()
    for entry in entries:
        low, _, high = entry.strip().partition("-")
        with contextlib.suppress(ValueError):
            a, b = int(low), int(high or low)
            if 0 < a <= b < 65536 and b - a < 65536:
                ports.update(range(a, b + 1))
    return ports


class DatagramFlows:
    """UDP flows for one owner (system-wide capture, or one SOCKS5 association).

    The same interface as UdpSessions: ``send(client, destination, data)``; answers go to
    ``answer(client, destination, data)``. Flows whose class is set to ``tunnel``, and every
    flow while there is no datagram session, ride their own tunnel connections as before.
    """

    def __init__(
        self,
        path: DatagramPath,
        take_tunnel: TakeTunnel,
        answer,
        settings,
        tunnel_sessions=None,
        **options: Any,
    ) -> None:
        from braid.daemon.tunnel.transparent import UdpSessions

        self._path = path
        self._answer = answer
        # ``options`` go to UdpSessions as they are (the owner's hooks, e.g. a sweep callback).
        self._tunnel = (tunnel_sessions or UdpSessions)(take_tunnel, self._from_tunnel, **options)
        self._settings = settings
        self._flows: dict[tuple, Flow] = {}
        self._sweeper: asyncio.Task | None = None

    def start(self) -> None:
        self._tunnel.start()
        self._sweeper = spawn(self._sweep(), name="datagram flows")

    @property
    def count(self) -> int:
        return len(self._flows)

    def _from_tunnel(self, client: tuple, destination: Address, data: bytes) -> None:
        flow = self._flows.get((client, destination))
        if flow is not None:
            flow.down += 1
            flow.last = asyncio.get_running_loop().time()
        self._answer(client, destination, data)

    def _modes(self) -> dict[str, str]:
        realtime = self._settings("udp_realtime")
        other = self._settings("udp_other")
        return {REALTIME: realtime, flowclass.OTHER: other, BULK: other}

    def send(
        self, client: tuple, destination: Address, data: bytes, dscp: int | None = None
    ) -> None:
        key = (client, destination)
        flow = self._flows.get(key)
        modes = self._modes()
        # A STUN message marks a call; a flow already marked is not looked at again.
        stun = (flow is None or not flow.listed) and flowclass.is_stun(data)
        if flow is None:
            listed = stun or destination.port in parse_ports(self._settings("realtime_ports"))
            klass = flowclass.classify(destination.port, dscp, listed, FlowMeter(), 0.0)
            flow = self._path.open_flow(
                client,
                destination,
                lambda payload, c=client, d=destination: self._answer(c, d, payload),
                modes[klass],
                listed,
                dscp,
            )
            flow.klass = klass
            if klass == REALTIME:
                self._path.on_realtime()
            self._flows[key] = flow
        elif stun:
            flow.listed = True  # a call's connectivity check: real-time from now on
        if flow.path == "datagram" and self._path.send(flow, data, modes):
            return
        if flow.path == "datagram":
            flow.path = "tunnel"  # the session is gone: this flow stays on the tunnel now
            flow.links = ()
            log.info("UDP to %s: no datagram session, carried by the tunnel", destination)
        flow.up += 1
        flow.last = now = asyncio.get_running_loop().time()
        flow.meter.add(now, len(data))  # a call on the tunnel path needs headroom too
        self._path.classify(flow, now)
        self._tunnel.send(client, destination, data)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, FLOW_IDLE / 2))
            now = asyncio.get_running_loop().time()
            for key, flow in list(self._flows.items()):
                if now - flow.last > FLOW_IDLE:
                    del self._flows[key]
                    self._path.forget(flow)

    async def close(self) -> None:
        if self._sweeper is not None:
            await cancel_all([self._sweeper])
        for flow in self._flows.values():
            self._path.forget(flow)
        self._flows.clear()
        await self._tunnel.close()


__all__ = ["DatagramFlows", "DatagramPath", "Flow", "parse_ports"]
