"""Command.DNS: the server answers the laptop's DNS messages through its own resolver.

So that names resolve as the server sees them (its resolver, its network),
whatever network the laptop is on. Each frame from the client is one raw DNS
query; it goes over UDP to the nameservers of the server's resolv.conf (2 s
each, the list twice), over TCP when the answer is truncated, and the answer
comes back as one frame, byte for byte. Queries of a session run
concurrently and their answers return in any order: the client matches them
by message id.

Only standard queries (opcode QUERY, one question) are forwarded: UPDATE,
NOTIFY and the rest get NOTIMP, and are never sent from the server's address.
An answer is taken only if it carries the query's id and the same question
(name case-insensitively, type and class), so an off-path spoofer must guess
the random source port, the random id and the name. A session over its limit
of queries in flight, and a query no nameserver answered, get SERVFAIL at once
rather than silence, so the laptop's resolver never waits out its timeout.

The nameservers are the administrator's own configuration, often on
loopback (systemd-resolved's 127.0.0.53), so the destination policy does not
apply to them; only their port 53 is ever contacted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from braid.aio import cancel_all, spawn
from braid.server.state import format_hostport
from braid.server.udp import DatagramPipe
from braid.transport import close_writer

log = logging.getLogger(__name__)

RESOLV_CONF = "/etc/resolv.conf"
DNS_PORT = 53
HEADER_LEN = 12
MAX_NAMESERVERS = 3  # glibc's MAXNS: stub resolvers ignore the lines after the third
FALLBACK_NAMESERVERS = ("127.0.0.53", "::1")
UDP_TIMEOUT = 2.0
TCP_TIMEOUT = 5.0
ROUNDS = 2  # the whole list, then once more
MAX_IN_FLIGHT = 64  # per session; beyond that, SERVFAIL at once
NAME_MAX = 255  # wire length of a domain name

OPCODE_QUERY = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NOTIMP = 4


# --- sans-IO ------------------------------------------------------------------------


def parse_resolv_conf(text: str) -> list[str]:
    """The nameserver addresses of a resolv.conf, in order, at most MAX_NAMESERVERS.

    Lines that are not valid ``nameserver ADDRESS`` are skipped, as glibc does.
    """
    out: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        try:
            address = str(ipaddress.ip_address(words[1]))
        except ValueError:
            continue
        if address not in out:
            out.append(address)
    return out[:MAX_NAMESERVERS]


def message_id(message: bytes) -> int:
    (ident,) = struct.unpack_from("!H", message)
    return ident


def is_query(message: bytes) -> bool:
    """A whole header with the QR bit clear; anything else is not worth forwarding."""
    return len(message) >= HEADER_LEN and not message[2] & 0x80


def is_truncated(message: bytes) -> bool:
    """The TC bit: the answer did not fit in UDP and must be asked again over TCP."""
    return len(message) >= HEADER_LEN and bool(message[2] & 0x02)


def opcode(message: bytes) -> int:
    return (message[2] >> 3) & 0x0F


def question(message: bytes) -> tuple[bytes, int, int, int] | None:
    """(name in lower case, type, class, end offset) of a message's only question.

    None unless there is exactly one question whose name is written out in full
    (a compression pointer in the first name of a message points nowhere valid).
    """
    if len(message) < HEADER_LEN:
        return None
    (qdcount,) = struct.unpack_from("!H", message, 4)
    if qdcount != 1:
        return None
    pos = HEADER_LEN
    for _ in range(128):  # labels of at least one byte each: a name has fewer
        if pos >= len(message):
            return None
        length = message[pos]
        if length == 0:
            name = message[HEADER_LEN : pos + 1]
            if len(name) > NAME_MAX or pos + 5 > len(message):
                return None
            qtype, qclass = struct.unpack_from("!2H", message, pos + 1)
            return name.lower(), qtype, qclass, pos + 5
        if length > 63:  # a pointer, or a reserved label type
            return None
        pos += 1 + length
    return None


def is_answer_to(answer: bytes, query: bytes) -> bool:
    """Same id, the QR bit set, and the same question: stray, late or spoofed datagrams
    are not taken for the answer."""
    if len(answer) < HEADER_LEN or answer[:2] != query[:2] or not answer[2] & 0x80:
        return False
    asked, got = question(query), question(answer)
    return asked is not None and got is not None and asked[:3] == got[:3]


def error_answer(query: bytes, rcode: int) -> bytes:
    """An answer to ``query`` with no records and ``rcode`` (FORMERR, SERVFAIL, NOTIMP).

    It keeps the id, the opcode and the RD bit, and repeats the question when there is
    exactly one, so the asker can match it.
    """
    flags1 = 0x80 | (query[2] & 0x79)  # QR, opcode, RD
    flags2 = 0x80 | rcode  # RA
    asked = question(query)
    if asked is None:
        return query[:2] + bytes([flags1, flags2]) + bytes(8)
    return (
        query[:2]
        + bytes([flags1, flags2])
        + struct.pack("!4H", 1, 0, 0, 0)
        + query[HEADER_LEN : asked[3]]
    )


# --- the resolver ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Nameserver:
    family: int
    sockaddr: tuple

    def __str__(self) -> str:
        return format_hostport(self.sockaddr[0], self.sockaddr[1])


def _nameserver(address: str) -> Nameserver | None:
    try:
        infos = socket.getaddrinfo(
            address, DNS_PORT, type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST
        )
    except (socket.gaierror, UnicodeError):
        return None  # e.g. a zone that names no interface
    family, _, _, _, sockaddr = infos[0]
    return Nameserver(family, sockaddr)


class Resolver:
    """Forwards DNS messages to the nameservers of resolv.conf, re-read when it changes."""

    def __init__(
        self,
        path: str | os.PathLike[str] = RESOLV_CONF,
        *,
        udp_timeout: float = UDP_TIMEOUT,
        tcp_timeout: float = TCP_TIMEOUT,
    ) -> None:
        self.path = Path(path)
        self.udp_timeout = udp_timeout
        self.tcp_timeout = tcp_timeout
        self._key: object = None
        self._servers: list[Nameserver] = []

    def nameservers(self) -> list[Nameserver]:
        """The current list; one stat per call, a re-read only when the file changed."""
        try:
            st = os.stat(self.path)
            key: object = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError as exc:
            key = ("unreadable", exc.errno)
        if key != self._key:
            self._key = key
            self._servers = self._load()
        return self._servers

    def _load(self) -> list[Nameserver]:
        try:
            listed = parse_resolv_conf(self.path.read_text(errors="replace"))
            why = "lists no usable nameserver"
        except OSError as exc:
            listed = []
            why = f"cannot be read ({exc.strerror or exc})"
        servers = [ns for ns in map(_nameserver, listed) if ns is not None]
        if servers:
            log.info("DNS: nameservers %s", ", ".join(map(str, servers)))
            return servers
        log.warning(
            "DNS: %s %s; asking %s instead",
            self.path,
            why,
            " and ".join(FALLBACK_NAMESERVERS),
        )
        return [ns for ns in map(_nameserver, FALLBACK_NAMESERVERS) if ns is not None]

    async def query(self, message: bytes) -> bytes | None:
        """The nameservers' answer to ``message``, exactly as sent; None if none answered."""
        servers = self.nameservers()
        for _ in range(ROUNDS):
            for server in servers:
                try:
                    answer = await self._udp(server, message)
                except (TimeoutError, OSError) as exc:
                    log.debug("DNS: %s over UDP: %s", server, _reason(exc))
                    continue
                if not is_truncated(answer):
                    return answer
                try:
                    return await self._tcp(server, message)
                except (TimeoutError, OSError, EOFError, ValueError) as exc:
                    log.debug("DNS: %s over TCP: %s", server, _reason(exc))
                    return answer  # truncated, but better than nothing
        return None

    async def _udp(self, server: Nameserver, message: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        # A socket per query: a fresh random source port, and no answer
        # meant for another query can arrive on it.
        sock = socket.socket(server.family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(server.sockaddr)
            async with asyncio.timeout(self.udp_timeout):
                await loop.sock_sendall(sock, message)
                while True:
                    answer = await loop.sock_recv(sock, 0xFFFF)
                    if is_answer_to(answer, message):
                        return answer
        finally:
            sock.close()

    async def _tcp(self, server: Nameserver, message: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        sock = socket.socket(server.family, socket.SOCK_STREAM)
        writer: asyncio.StreamWriter | None = None
        try:
            sock.setblocking(False)
            async with asyncio.timeout(self.tcp_timeout):
                await loop.sock_connect(sock, server.sockaddr)
                reader, writer = await asyncio.open_connection(sock=sock)
                writer.write(struct.pack("!H", len(message)) + message)
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                answer = await reader.readexactly(length)
        finally:
            if writer is not None:
                await close_writer(writer)
            else:
                sock.close()
        if not is_answer_to(answer, message):
            raise ValueError("the answer does not match the query")
        return answer


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


# --- a session ------------------------------------------------------------------------


async def serve_dns(pipe: DatagramPipe, resolver: Resolver, limit: int = MAX_IN_FLIGHT) -> str:
    """Answer the client's queries until it ends the session or it is idle; returns which.

    Raises what broke the tunnel (the caller then drops it).
    """
    inflight: set[asyncio.Task] = set()
    try:
        while True:
            try:
                frames = await pipe.receive()
            except TimeoutError:
                if inflight:  # a slow nameserver is not an idle client
                    pipe.touch()
                    continue
                reason = "idle"
                break
            if frames is None:
                if inflight:
                    await asyncio.wait(inflight)  # bounded by the resolver's timeouts
                reason = "ended by the client"
                break
            for query in frames:
                refusal = _refusal(query, len(inflight) >= limit)
                if refusal is not None:
                    if refusal:
                        await pipe.send(refusal)
                    continue
                task = spawn(_answer(pipe, resolver, query), f"dns query {message_id(query)}")
                inflight.add(task)
                task.add_done_callback(inflight.discard)
    finally:
        await cancel_all(list(inflight))
    await pipe.finish()
    return reason


def _refusal(query: bytes, full: bool) -> bytes | None:
    """None if ``query`` may go to the nameservers; else the answer to send at once
    (empty when there is no one to answer: not a query at all)."""
    if not is_query(query):
        log.debug("DNS: dropped a message of %d bytes", len(query))
        return b""
    if opcode(query) != OPCODE_QUERY:
        log.debug("DNS: opcode %d is not forwarded", opcode(query))
        return error_answer(query, RCODE_NOTIMP)
    if question(query) is None:
        return error_answer(query, RCODE_FORMERR)
    if full:
        return error_answer(query, RCODE_SERVFAIL)
    return None


async def _answer(pipe: DatagramPipe, resolver: Resolver, query: bytes) -> None:
    answer = await resolver.query(query)
    if answer is None:
        log.debug("DNS: no nameserver answered query %d", message_id(query))
        answer = error_answer(query, RCODE_SERVFAIL)
    try:
        await pipe.send(answer)
    except OSError as exc:  # the tunnel died; the session's reader sees it too
        log.debug("DNS: cannot send an answer: %s", exc)


__all__ = [
    "Nameserver",
    "Resolver",
    "error_answer",
    "is_answer_to",
    "is_query",
    "is_truncated",
    "message_id",
    "opcode",
    "parse_resolv_conf",
    "question",
    "serve_dns",
]
