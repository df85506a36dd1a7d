"""braid-server's end of the datagram path (see braid.protocol.datagram).

A client asks for a session on an authenticated tunnel connection (Command.DATAGRAM) and gets a
session id and key in one frame; the session lives as long as that connection. Sealed packets
then arrive on the UDP port the probes use (the probe responder hands over everything that starts
with the datagram magic) or as frames on the connection. The server

* drops, silently and counted, anything that is not authentic for a live session, any sequence
  number it has accepted before (replays) and any datagram number it delivered before (the
  redundant copy that lost the race);
* relays each flow's datagrams to its destination from a connected UDP socket of its own, after
  the same policy check as Command.UDP;
* sends what the destination answers back on the links the client's latest datagram of that
  flow asked for, to the address that link's latest authentic packet came from, or as a frame
  on the connection. A PONG is never larger than the PING it answers, and nothing goes to an
  address that has not sent an authentic packet of the session in the last ``ADDRESS_FRESH``
  seconds: the port cannot be used as a reflector or amplifier.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields

from braid.aio import spawn
from braid.protocol import datagram as dg
from braid.protocol.address import Address
from braid.protocol.tunnel import FrameDecoder, Reply, encode_reply, frame_header
from braid.server.udp import TRANSIENT_ERRNOS
from braid.transport import READ_SIZE, close_writer

log = logging.getLogger(__name__)

MAX_SESSIONS = 256
MAX_FLOWS = 4096  # all sessions together: each flow holds a socket
MAX_FLOWS_PER_SESSION = 1024
ADDRESS_FRESH = 30.0  # a link's address is answered only this long after its last packet
QUEUED_WHILE_OPENING = 16
TUNNEL_BACKLOG = 256 << 10  # frames waiting on the connection beyond this are dropped
MAX_UDP_PAYLOAD = 65507


@dataclass
class DatagramStats:
    received: int = 0
    forged: int = 0  # the magic, but not authentic for a live session
    unknown_session: int = 0
    replayed: int = 0
    duplicates: int = 0  # redundant copies that arrived second
    refused: int = 0  # flows the policy refused, or beyond the limits
    up: int = 0  # datagrams relayed to destinations
    down: int = 0  # datagrams from destinations sent back (each copy counted)

    def summary(self) -> str:
        return ", ".join(
            f"{getattr(self, f.name)} {f.name.replace('_', ' ')}" for f in fields(self)
        )


@dataclass
class _LinkAddress:
    addr: tuple
    heard: float  # monotonic
    stamp: int  # the client's latest stamp on this link
    stamp_at: int  # our clock (ns) when it arrived


@dataclass
class _Flow:
    address: Address
    sock: socket.socket | None = None
    down: int = 0
    last: float = field(default_factory=time.monotonic)
    queue: list[bytes] = field(default_factory=list)
    refused: bool = False


OpenUdp = Callable[[Address], Awaitable[object]]


class Session:
    def __init__(self, owner: DatagramSessions, session_id: bytes, key: bytes, writer) -> None:
        self.owner = owner
        self.id = session_id
        self.sealer = dg.Sealer(session_id, key, dg.DOWN)
        self.replay = dg.ReplayWindow()
        self.dedup = dg.ReplayWindow()
        self.links: dict[int, _LinkAddress] = {}
        self.rooms: dict[int, int] = {}  # the largest packet each link takes, as it said
        self.flows: dict[int, _Flow] = {}
        self.writer = writer
        self.last = time.monotonic()
        self._number = 0
        self.closed = False

    # -- up ----------------------------------------------------------------------------

    def received(self, data: bytes, addr: tuple | None) -> None:
        """One sealed packet, from a link (``addr``) or the tunnel (None)."""
        stats = self.owner.stats
        opened = self.sealer.open(data)
        if opened is None:
            stats.forged += 1
            return
        seq, packet = opened
        if not self.replay.check(seq):
            stats.replayed += 1
            return
        now = time.monotonic()
        self.last = now
        if addr is not None and packet.link < dg.MAX_LINKS:
            self.links[packet.link] = _LinkAddress(addr, now, packet.stamp, time.monotonic_ns())
        if packet.kind == dg.Kind.PING:
            room = dg.ping_room(packet.payload)
            if room is not None and packet.link < dg.MAX_LINKS:
                self.rooms[packet.link] = room
            reply = dg.Packet(dg.Kind.PONG, packet.link, 0, *self._echo(packet.link))
            self._send(self.sealer.seal(reply), addr, limit=len(data))
        elif packet.kind == dg.Kind.DATA:
            self._data(packet, now)
        elif packet.kind == dg.Kind.CLOSE:
            flow = self.flows.get(packet.flow)
            if flow is not None:
                self._close_flow(packet.flow, flow)

    def _data(self, packet: dg.Packet, now: float) -> None:
        stats = self.owner.stats
        if not self.dedup.check(packet.number):
            stats.duplicates += 1
            return
        flow = self.flows.get(packet.flow)
        if flow is None:
            if packet.address is None or not self.owner.may_open(self):
                stats.refused += 1
                return
            flow = self.flows[packet.flow] = _Flow(packet.address)
            self.owner.flows += 1
            spawn(self._open(packet.flow, flow), name=f"datagram flow {packet.address}")
        elif flow.address != packet.address:
            return  # one flow, one destination
        flow.down = packet.down
        flow.last = now
        if flow.sock is None:
            if not flow.refused and len(flow.queue) < QUEUED_WHILE_OPENING:
                flow.queue.append(packet.payload)
            return
        self._to_destination(flow, packet.payload)

    async def _open(self, number: int, flow: _Flow) -> None:
        outcome = await self.owner.open_udp(flow.address)
        sock = getattr(outcome, "sock", None)
        if self.closed or self.flows.get(number) is not flow:
            if sock is not None:
                sock.close()
            return
        if sock is None:
            flow.refused = True
            flow.queue.clear()
            self.owner.stats.refused += 1
            log.info(
                "datagram flow to %s refused: %s", flow.address, getattr(outcome, "detail", "")
            )
            return
        flow.sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._from_destination, number, flow)
        for payload in flow.queue:
            self._to_destination(flow, payload)
        flow.queue.clear()

    def _to_destination(self, flow: _Flow, payload: bytes) -> None:
        assert flow.sock is not None
        for _ in range(2):  # a pending ICMP error eats one send
            try:
                flow.sock.send(payload)
                self.owner.stats.up += 1
                return
            except OSError as exc:
                if exc.errno not in TRANSIENT_ERRNOS:
                    log.debug("datagram to %s: %s", flow.address, exc)
                    return

    # -- down --------------------------------------------------------------------------

    def _from_destination(self, number: int, flow: _Flow) -> None:
        for _ in range(64):  # bounded: let the loop breathe under a flood
            if flow.sock is None:
                return
            try:
                payload = flow.sock.recv(MAX_UDP_PAYLOAD)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in TRANSIENT_ERRNOS:
                    continue
                return
            flow.last = time.monotonic()
            self._number += 1
            links = [n for n in range(dg.MAX_LINKS) if flow.down >> n & 1]
            sent = False
            for link in links:
                address = self.links.get(link)
                if address is None or flow.last - address.heard > ADDRESS_FRESH:
                    continue
                packet = dg.Packet(
                    dg.Kind.DATA, link, 0, *self._echo(link), number, self._number, None, payload
                )
                sealed = self.sealer.seal(packet)
                if len(sealed) > self.rooms.get(link, dg.DEFAULT_ROOM):
                    continue  # never fragmented: too large for this link, the tunnel takes it
                sent = self._send(sealed, address.addr) or sent
            if not sent:
                packet = dg.Packet(
                    dg.Kind.DATA,
                    dg.TUNNEL_LINK,
                    0,
                    *self._echo(-1),
                    number,
                    self._number,
                    None,
                    payload,
                )
                self._send(self.sealer.seal(packet), None)

    def _echo(self, link: int) -> tuple[int, int, int]:
        """(our stamp, the link's latest client stamp, how long we held it in µs)."""
        now = time.monotonic_ns()
        address = self.links.get(link)
        if address is None:
            return dg.stamp_us(now), 0, 0
        return dg.stamp_us(now), address.stamp, (now - address.stamp_at) // 1000

    def _send(self, sealed: bytes, addr: tuple | None, limit: int | None = None) -> bool:
        if limit is not None and len(sealed) > limit:
            return False  # never larger than what it answers
        if addr is None:
            writer = self.writer
            if writer.is_closing() or writer.transport.get_write_buffer_size() > TUNNEL_BACKLOG:
                return False
            writer.writelines((frame_header(len(sealed)), sealed))
        else:
            transport = self.owner.transport
            if transport is None or len(sealed) > MAX_UDP_PAYLOAD:
                return False
            transport.sendto(sealed, addr)
        self.owner.stats.down += 1
        return True

    # -- life --------------------------------------------------------------------------

    def sweep(self, now: float, idle: float) -> None:
        for number, flow in list(self.flows.items()):
            if now - flow.last > idle:
                self._close_flow(number, flow)

    def _close_flow(self, number: int, flow: _Flow) -> None:
        self.flows.pop(number, None)
        self.owner.flows -= 1
        if flow.sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(flow.sock.fileno())
            flow.sock.close()
            flow.sock = None

    def close(self) -> None:
        self.closed = True
        for number, flow in list(self.flows.items()):
            self._close_flow(number, flow)


class DatagramSessions:
    """Every live datagram session of the server, and the UDP port's share of them."""

    def __init__(self, open_udp: OpenUdp, idle: float) -> None:
        self.open_udp = open_udp
        self.idle = idle
        self.transport: asyncio.DatagramTransport | None = None
        self.stats = DatagramStats()
        self.flows = 0
        self._sessions: dict[bytes, Session] = {}

    def attach(self, responder) -> None:
        """Share the probe responder's UDP socket (same port, so the links' NAT bindings match)."""
        if responder is None:
            return  # no UDP port: sessions still work as frames on their connections
        responder.other = self.received
        self.transport = responder.transport
        sock = responder.transport.get_extra_info("socket") if responder.transport else None
        if sock is not None:
            # Never fragment an answer: one too large for a link goes by the tunnel instead.
            for level, option in ((socket.IPPROTO_IP, 10), (socket.IPPROTO_IPV6, 23)):
                with contextlib.suppress(OSError):
                    sock.setsockopt(level, option, 2)  # IP(V6)_MTU_DISCOVER = PMTUDISC_DO

    def may_open(self, session: Session) -> bool:
        return self.flows < MAX_FLOWS and len(session.flows) < MAX_FLOWS_PER_SESSION

    def received(self, data: bytes, addr: tuple) -> bool:
        """A datagram on the UDP port: True if it is the datagram path's (handled or dropped)."""
        if data[:2] != dg.MAGIC:
            return False
        self.stats.received += 1
        if not dg.looks_like_datagram(data) or addr[1] < 1024:
            self.stats.forged += 1
            return True
        session = self._sessions.get(dg.session_id_of(data))
        if session is None:
            self.stats.unknown_session += 1
            return True
        session.received(data, addr)
        return True

    async def serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, label: str
    ) -> None:
        """Command.DATAGRAM: grant a session and carry its frames until the connection ends."""
        if len(self._sessions) >= MAX_SESSIONS:
            log.warning("%s: too many datagram sessions (%d); refused", label, MAX_SESSIONS)
            writer.write(encode_reply(Reply.GENERAL_FAILURE))
            await writer.drain()
            await close_writer(writer)
            return
        session_id, key = dg.new_grant()
        session = Session(self, session_id, key, writer)
        self._sessions[session_id] = session
        grant = dg.pack_grant(session_id, key)
        writer.write(encode_reply(Reply.SUCCEEDED) + frame_header(len(grant)) + grant)
        log.debug("%s: datagram session %s", label, session_id.hex())
        decoder = FrameDecoder()
        sweeper = spawn(self._sweep(session), name="datagram session sweep")
        try:
            await writer.drain()
            while not decoder.eof:
                try:
                    async with asyncio.timeout(self.idle):
                        data = await reader.read(READ_SIZE)
                except TimeoutError:
                    if time.monotonic() - session.last > self.idle:
                        break
                    continue
                if not data:
                    break
                for frame in decoder.feed(data):
                    self.stats.received += 1
                    session.received(frame, None)
        finally:
            sweeper.cancel()
            self._sessions.pop(session_id, None)
            session.close()
            await close_writer(writer)
            log.debug(
                "%s: datagram session %s ended; %s", label, session_id.hex(), self.stats.summary()
            )

    async def _sweep(self, session: Session) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.idle / 2))
            session.sweep(time.monotonic(), self.idle)


__all__ = ["DatagramSessions", "DatagramStats", "Session"]
