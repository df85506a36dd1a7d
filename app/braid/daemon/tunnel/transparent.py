"""System-wide mode inside braidd: the transparent TCP and UDP listeners, UDP sessions and DNS.

The laptop's own TCP arrives through an nftables redirect; its original destination is read with
SO_ORIGINAL_DST. Forwarded TCP (containers, VMs, a shared hotspot) arrives through TPROXY on the
same transparent listener and keeps its destination as the socket's own address. Either flow is
carried exactly like a SOCKS5 CONNECT.

UDP arrives through TPROXY on a transparent socket that reports each datagram's
original destination (IP_RECVORIGDSTADDR). Every (source, destination) pair is a
session riding its own tunnel connection (Command.UDP), closed when idle. Answers
go back from a transparent socket bound to the original destination, so the
application sees them come from where it sent.

DNS (port 53) takes its own path: every query goes to the server over one shared
DNS tunnel (Command.DNS) and is resolved there, whatever resolver the laptop is
configured with; answers come back byte for byte (AAAA included) except for the
message id, which braidd rewrites so queries of different applications never clash.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import os
import secrets
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from braid.aio import spawn
from braid.daemon.routing.capture import OWN_MARK
from braid.logs import reason
from braid.protocol.address import Address
from braid.protocol.socks5 import encode_reply
from braid.protocol.tunnel import Command, Reply
from braid.tunnel_client import Tunnel, TunnelError

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80
IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = 20
IPV6_RECVORIGDSTADDR = 74
IPV6_TRANSPARENT = 75
IP_RECVTOS, IP_TOS = 13, 1
IPV6_RECVTCLASS, IPV6_TCLASS = 66, 67
#: A UDP session, and the socket its answers leave from, is released after this long unused.
#: (The environment variable is for tests that watch the release.)
UDP_IDLE = float(os.environ.get("BRAID_UDP_IDLE", 60.0))
DNS_IDLE = 30.0
DNS_TIMEOUT = 5.0
MAX_SESSIONS = 4096
#: Answer sockets kept at most; past it the longest unused one is closed (and made again if an
#: answer needs it).
MAX_REPLY_SOCKETS = 1024

TakeTunnel = Callable[[], Awaitable[Tunnel]]


def original_destination(sock: socket.socket) -> Address:
    """Where a redirected TCP connection was going (netfilter's conntrack knows)."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        port = struct.unpack_from("!H", raw, 2)[0]
        host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
    else:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack_from("!H", raw, 2)[0]
        host = socket.inet_ntop(socket.AF_INET, raw[4:8])
    return Address(host, port)


def _plain(host: str) -> str:
    if host.startswith("::ffff:"):
        return host.removeprefix("::ffff:")
    return host


def mark_own(sock: socket.socket) -> None:
    """Mark one of braidd's sockets so system-wide capture never loops it back."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, OWN_MARK)


def _decode_origdst(cmsg_level: int, data: bytes) -> tuple[str, int]:
    family = struct.unpack_from("=H", data, 0)[0]
    port = struct.unpack_from("!H", data, 2)[0]
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, data[8:24]), port
    return socket.inet_ntop(socket.AF_INET, data[4:8]), port


def _destination(sock: socket.socket) -> Address:
    """Where an accepted connection was going: TPROXY (forwarded traffic) keeps the original
    destination as the socket's own address; the nat redirect (the laptop's own) rewrites it."""
    host, port = sock.getsockname()[:2]
    if not ipaddress.ip_address(_plain(host)).is_loopback:
        return Address(host, port)
    return original_destination(sock)


def _transparent_listener(host: str, port: int) -> socket.socket:
    """A listening socket that also accepts connections TPROXY hands it for other addresses."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        else:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class TransparentTcp:
    """Accepts redirected TCP on loopback and hands each flow to ``carry``.

    ``admit(writer, original_destination)`` counts a flow against its owner's cap (see
    SocksServer.admit): a function giving the place back, or None to refuse it.
    """

    def __init__(self, port: int, carry, track, admit=None) -> None:
        self.port = port
        self._carry = carry
        self._track = track
        self._admit = admit
        self._servers: list[asyncio.base_events.Server] = []

    async def start(self) -> None:
        for host in ("127.0.0.1", "::1"):
            try:
                server = await asyncio.start_server(
                    self._accept, sock=_transparent_listener(host, self.port), backlog=1024
                )
            except OSError as exc:
                if host == "::1":  # no IPv6 on this machine
                    log.info("transparent TCP on [::1] unavailable: %s", exc)
                    continue
                raise
            self._servers.append(server)
            if self.port == 0:
                self.port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        self._servers = []

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._track(task)
        sock = writer.get_extra_info("socket")
        try:
            address = _destination(sock)
        except OSError as exc:
            log.warning("redirected connection without an original destination: %s", exc)
            writer.close()
            return
        release = self._admit(writer, (address.host, address.port)) if self._admit else None
        if self._admit is not None and release is None:
            writer.transport.abort()
            return
        address = Address(_plain(address.host), address.port)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await self._carry(reader, writer, address)
        except (OSError, asyncio.IncompleteReadError) as exc:
            log.debug("transparent flow to %s ended: %s", address, exc)
        finally:
            try:
                with contextlib.suppress(Exception):
                    writer.close()
                    await asyncio.wait_for(writer.wait_closed(), 5)
            finally:
                if release is not None:
                    release()  # only once its descriptor is gone


@dataclass
class _Session:
    tunnel: Tunnel | None
    last: float = field(default_factory=time.monotonic)
    queue: list[bytes] = field(default_factory=list)
    task: asyncio.Task | None = None


class ReplySockets:
    """Transparent sockets bound to the addresses answers must appear to come from.

    One per address that answered; released once unused for ``idle`` seconds (:meth:`sweep`) or
    when more than ``most`` are open, longest unused first.
    """

    def __init__(self, idle: float = UDP_IDLE, most: int = MAX_REPLY_SOCKETS) -> None:
        self._idle = idle
        self._most = most
        # Least recently used first: (socket, when it last sent).
        self._socks: collections.OrderedDict[tuple[str, int], tuple[socket.socket, float]] = (
            collections.OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._socks)

    def get(self, source: tuple[str, int]) -> socket.socket:
        entry = self._socks.pop(source, None)
        sock = entry[0] if entry is not None else self._open(source)
        self._socks[source] = (sock, time.monotonic())
        while len(self._socks) > self._most:
            _, (oldest, _) = self._socks.popitem(last=False)
            oldest.close()
        return sock

    @staticmethod
    def _open(source: tuple[str, int]) -> socket.socket:
        family = socket.AF_INET6 if ":" in source[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            else:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            mark_own(sock)
            sock.setblocking(False)
            sock.bind(source)
        except OSError:
            sock.close()
            raise
        return sock

    def send(self, source: tuple[str, int], to: tuple[str, int], data: bytes) -> None:
        try:
            self.get(source).sendto(data, to)
        except OSError as exc:
            log.debug("answer from %s to %s lost: %s", source, to, exc)

    def sweep(self, now: float | None = None) -> int:
        """Close the sockets unused for ``idle`` seconds; how many were closed."""
        now = time.monotonic() if now is None else now
        closed = 0
        while self._socks:
            source, (sock, last) = next(iter(self._socks.items()))
            if now - last <= self._idle:
                break
            del self._socks[source]
            sock.close()
            closed += 1
        return closed

    def drop(self, source: tuple[str, int]) -> None:
        entry = self._socks.pop(source, None)
        if entry is not None:
            entry[0].close()

    def close(self) -> None:
        for sock, _ in self._socks.values():
            sock.close()
        self._socks.clear()


DNS_IN_FLIGHT = 4096  # queries waiting for an answer; more are refused at once


class DnsRelay:
    """All DNS queries over one tunnel, resolved at the server; ids rewritten to stay unique.

    The ids sent are random: they are half of what stops an off-path spoofer at the
    server's resolver (the source port is the other), so they must not be guessable.
    """

    def __init__(self, take_tunnel: TakeTunnel) -> None:
        self._take_tunnel = take_tunnel
        self._tunnel: Tunnel | None = None
        self._opening: asyncio.Lock = asyncio.Lock()
        self._pending: dict[int, tuple[int, asyncio.Future[bytes]]] = {}
        self._reader: asyncio.Task | None = None
        self.queries = 0
        self.failures = 0
        #: Sees every answer before the application does (bypass by domain fills its sets).
        self.on_answer: Callable[[bytes], Awaitable[None]] | None = None

    async def resolve(self, query: bytes) -> bytes | None:
        """The server's answer to a raw DNS query, or None (timeout, no tunnel)."""
        if len(query) < 12:
            return None
        self.queries += 1
        original_id = struct.unpack_from("!H", query, 0)[0]
        query_id = self._allocate()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[query_id] = (original_id, future)
        try:
            tunnel = await self._ensure_tunnel()
            await tunnel.send_datagram(struct.pack("!H", query_id) + query[2:])
            answer = await asyncio.wait_for(future, DNS_TIMEOUT)
        except (TunnelError, ConnectionError, TimeoutError, OSError) as exc:
            self.failures += 1
            log.info("DNS query failed: %s", reason(exc))
            return None
        finally:
            self._pending.pop(query_id, None)
        if self.on_answer is not None:
            await self.on_answer(answer)
        return struct.pack("!H", original_id) + answer[2:]

    def _allocate(self) -> int:
        """A random id not in use; at most DNS_IN_FLIGHT of 65536 are, so a few tries do."""
        if len(self._pending) >= DNS_IN_FLIGHT:
            raise TunnelError("too many DNS queries in flight")
        for _ in range(64):
            query_id = secrets.randbelow(0x10000)
            if query_id not in self._pending:
                return query_id
        start = secrets.randbelow(0x10000)  # all unlucky (about never): the next free one
        return next(
            i % 0x10000 for i in range(start, start + 0x10000) if i % 0x10000 not in self._pending
        )

    async def _ensure_tunnel(self) -> Tunnel:
        async with self._opening:
            if self._tunnel is not None and self._tunnel.is_alive():
                return self._tunnel
            tunnel = await self._take_tunnel()
            reply = await tunnel.request(Address("0.0.0.0", 53), command=Command.DNS)
            if reply.code is not Reply.SUCCEEDED:
                await tunnel.close()
                raise TunnelError(f"the server refused DNS: {reply.code.describe()}")
            self._tunnel = tunnel
            self._reader = spawn(self._read(tunnel), name="dns-answers")
            return tunnel

    async def _read(self, tunnel: Tunnel) -> None:
        try:
            while True:
                answer = await tunnel.receive_datagram()
                if answer is None:
                    break
                if len(answer) < 12:
                    continue
                pending = self._pending.get(struct.unpack_from("!H", answer, 0)[0])
                if pending is not None and not pending[1].done():
                    pending[1].set_result(answer)
        except (TunnelError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if self._tunnel is tunnel:
                self._tunnel = None
            await tunnel.close()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._tunnel is not None:
            await self._tunnel.close()
            self._tunnel = None


class UdpSessions:
    """UDP flows keyed by (client, destination), each over its own tunnel connection.

    ``answer(client, destination, data)`` delivers what comes back.
    """

    def __init__(
        self,
        take_tunnel: TakeTunnel,
        answer: Callable,
        idle: float = UDP_IDLE,
        on_sweep: Callable[[], object] | None = None,
    ) -> None:
        self._take_tunnel = take_tunnel
        self._answer = answer
        self._idle = idle
        self._on_sweep = on_sweep  # also run at each sweep (the answer sockets')
        self._sessions: dict[tuple, _Session] = {}
        self._sweeper: asyncio.Task | None = None
        self.datagrams_up = 0
        self.datagrams_down = 0
        self.dropped = 0  # the tunnel was too far behind: dropped, as UDP may

    def start(self) -> None:
        self._sweeper = spawn(self._sweep(), name="udp-sessions")

    @property
    def count(self) -> int:
        return len(self._sessions)

    def send(
        self, client: tuple, destination: Address, data: bytes, dscp: int | None = None
    ) -> None:
        key = (client, destination)
        session = self._sessions.get(key)
        if session is None:
            if len(self._sessions) >= MAX_SESSIONS:
                log.warning("too many UDP sessions; dropping a datagram to %s", destination)
                return
            session = self._sessions[key] = _Session(tunnel=None)
            session.task = spawn(self._run(key, session), name=f"udp-{destination}")
        session.last = time.monotonic()
        self.datagrams_up += 1
        if session.tunnel is None:
            if len(session.queue) < 64:
                session.queue.append(data)
            return
        if not session.tunnel.queue_datagram(data):
            self.dropped += 1

    async def _run(self, key: tuple, session: _Session) -> None:
        client, destination = key
        try:
            tunnel = await self._take_tunnel()
            reply = await tunnel.request(destination, command=Command.UDP)
            if reply.code is not Reply.SUCCEEDED:
                await tunnel.close()
                log.info("UDP to %s refused: %s", destination, reply.code.describe())
                return
            session.tunnel = tunnel
            for data in session.queue:
                await tunnel.send_datagram(data)
            session.queue.clear()
            while True:
                data = await tunnel.receive_datagram()
                if data is None:
                    break
                session.last = time.monotonic()
                self.datagrams_down += 1
                self._answer(client, destination, data)
        except (TunnelError, ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
            log.debug("UDP session to %s ended: %s", destination, exc)
        finally:
            self._sessions.pop(key, None)
            if session.tunnel is not None:
                await session.tunnel.close()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self._idle / 2))
            now = time.monotonic()
            for session in list(self._sessions.values()):
                if now - session.last > self._idle and session.task is not None:
                    session.task.cancel()
            if self._on_sweep is not None:
                self._on_sweep()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        tasks = [s.task for s in self._sessions.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class TransparentUdp:
    """The TPROXY socket: datagrams with their original destination, answered from it."""

    def __init__(
        self, port: int, take_tunnel: TakeTunnel, dns: DnsRelay, make_sessions=UdpSessions
    ) -> None:
        self.port = port
        self._dns = dns
        self._replies = ReplySockets()
        self.sessions = make_sessions(take_tunnel, self._answer, on_sweep=self._replies.sweep)
        self._socks: list[socket.socket] = []

    def _answer(self, client: tuple, destination: Address, data: bytes) -> None:
        self._replies.send((destination.host, destination.port), client, data)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVTCLASS, 1)
                else:
                    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                    sock.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
                    sock.setsockopt(socket.SOL_IP, IP_RECVTOS, 1)  # DSCP marks calls
                mark_own(sock)
                sock.setblocking(False)
                sock.bind((host, self.port))
            except OSError as exc:
                sock.close()
                if family == socket.AF_INET6:
                    log.info("transparent UDP on [::1] unavailable: %s", exc)
                    continue
                raise
            if self.port == 0:
                self.port = sock.getsockname()[1]
            loop.add_reader(sock.fileno(), self._readable, sock)
            self._socks.append(sock)
        self.sessions.start()

    def _readable(self, sock: socket.socket) -> None:
        for _ in range(64):  # bounded: let the loop breathe under a flood
            try:
                data, ancillary, _flags, client = sock.recvmsg(65535, 128)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("transparent UDP receive: %s", exc)
                return
            destination = None
            dscp = None
            for level, kind, payload in ancillary:
                if kind in (IP_RECVORIGDSTADDR, IPV6_RECVORIGDSTADDR):
                    destination = _decode_origdst(level, payload)
                elif (level, kind) in ((socket.SOL_IP, IP_TOS), (socket.IPPROTO_IPV6, IPV6_TCLASS)):
                    raw = (
                        payload[0]
                        if level == socket.SOL_IP
                        else struct.unpack("=i", payload[:4])[0]
                    )
                    dscp = raw >> 2
            if destination is None:
                continue
            client = (client[0], client[1])
            host, port = _plain(destination[0]), destination[1]
            if port == 53:
                spawn(self._dns_query(client, (destination[0], port), data), name="dns")
                continue
            self.sessions.send(client, Address(host, port), data, dscp)

    async def _dns_query(self, client: tuple, server: tuple, query: bytes) -> None:
        answer = await self._dns.resolve(query)
        if answer is not None:
            self._replies.send(server, client, answer)

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self._socks:
            loop.remove_reader(sock.fileno())
            sock.close()
        self._socks = []
        await self.sessions.close()
        self._replies.close()


async def serve_dns_over_tcp(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, dns: DnsRelay
) -> None:
    """DNS over TCP (two-byte length prefix), answered through the server like UDP queries."""
    try:
        while True:
            head = await asyncio.wait_for(reader.readexactly(2), DNS_IDLE)
            (length,) = struct.unpack("!H", head)
            query = await reader.readexactly(length)
            answer = await dns.resolve(query)
            if answer is None:
                break
            writer.write(struct.pack("!H", len(answer)) + answer)
            await writer.drain()
    except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
        pass


class SocksUdp:
    """SOCKS5 UDP ASSOCIATE (RFC 1928 section 7) over the tunnel's UDP sessions."""

    def __init__(self, take_tunnel: TakeTunnel, bind_host: str, make_sessions=UdpSessions) -> None:
        self._take_tunnel = take_tunnel
        self._bind_host = bind_host
        self._make_sessions = make_sessions

    async def associate(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _hint: Address
    ) -> None:
        from braid.protocol.address import decode_address, encode_address

        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self._bind_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind((self._bind_host, 0))
        peer_host = writer.get_extra_info("peername")[0]

        def answer(client: tuple, destination: Address, data: bytes) -> None:
            header = b"\x00\x00\x00" + encode_address(destination)
            with contextlib.suppress(OSError):
                sock.sendto(header + data, client)

        sessions = self._make_sessions(self._take_tunnel, answer)
        sessions.start()

        def readable() -> None:
            for _ in range(64):
                try:
                    data, client = sock.recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    return
                # Only the client that asked for the association may use it.
                if ipaddress.ip_address(client[0]) != ipaddress.ip_address(peer_host):
                    continue
                if len(data) < 4 or data[2] != 0:  # fragments are not supported
                    continue
                try:
                    decoded = decode_address(data, 3)
                except ValueError:
                    continue
                if decoded is None:
                    continue
                destination, end = decoded
                sessions.send(client, destination, data[end:])

        loop.add_reader(sock.fileno(), readable)
        host, port = sock.getsockname()[:2]
        writer.write(encode_reply(Reply.SUCCEEDED, Address(host, port)))
        try:
            # The association lives as long as its TCP control connection.
            while await reader.read(4096):
                pass
        finally:
            loop.remove_reader(sock.fileno())
            await sessions.close()
            sock.close()
