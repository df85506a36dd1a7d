"""A small DNS server and client for the test world, with hand-built messages (RFC 1035).

The server is authoritative for one zone (``braid.test`` by default) and answers like the
recursive resolver of an ISP would for it: NOERROR with the records, NOERROR without answers
(NODATA) for a name that has none of the asked type, NXDOMAIN for a name that does not exist, both
negative answers with the zone's SOA. Names outside the zone are REFUSED: there is no upstream.
It serves UDP and TCP (two-byte length prefix), IPv4 and IPv6, and reports every query to a log
callback before it answers, so a client holding an answer can already find its query in the log.

:func:`query` is the matching client, independent of the system's resolver. As a program::

    python -m braid.netbed.dns [--tcp] [--device eth0] 198.19.0.53 files.braid.test AAAA

prints the answer as one JSON object (rcode, authoritative, addresses) and exits with status 0
for NOERROR, 1 for another rcode and 2 when no answer came (timeout, refusal, garbage).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

TYPES = {
    "A": 1,
    "NS": 2,
    "CNAME": 5,
    "SOA": 6,
    "PTR": 12,
    "MX": 15,
    "TXT": 16,
    "AAAA": 28,
    "SRV": 33,
    "OPT": 41,
    "SVCB": 64,
    "HTTPS": 65,
    "ANY": 255,
}
TYPE_NAMES = {value: name for name, value in TYPES.items()}
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
CLASS_IN = 1
FLAG_QR, FLAG_AA, FLAG_TC, FLAG_RD, FLAG_RA = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080
OPCODE_MASK = 0x7800
HEADER = struct.Struct("!HHHHHH")
RR_FIXED = struct.Struct("!HHIH")
#: Bounds on what a peer can make us do.
MAX_POINTERS = 32
MAX_TCP_QUERIES = 100
MAX_TCP_CLIENTS = 64
TCP_IDLE_TIMEOUT = 10.0
TTL = 60

Logger = Callable[..., None]


class DnsError(ValueError):
    """Bytes that are not a DNS message (or not one we can parse)."""


def type_code(qtype: str | int) -> int:
    """``"AAAA"`` or ``28`` -> 28; ``"TYPE65"`` is accepted too."""
    if isinstance(qtype, int):
        return qtype
    name = qtype.upper()
    if name in TYPES:
        return TYPES[name]
    if name.startswith("TYPE") and name[4:].isdigit():
        return int(name[4:])
    raise ValueError(f"unknown record type {qtype!r}")


def type_name(code: int) -> str:
    return TYPE_NAMES.get(code, f"TYPE{code}")


def normalize(name: str) -> str:
    """Lower case, no trailing dot (the root is ``""``)."""
    return name.rstrip(".").lower()


def encode_name(name: str) -> bytes:
    out = bytearray()
    for label in filter(None, name.rstrip(".").split(".")):
        raw = label.encode("idna") if not label.isascii() else label.encode()
        if len(raw) > 63:
            raise DnsError(f"label too long: {label!r}")
        out += bytes([len(raw)]) + raw
    if len(out) + 1 > 255:
        raise DnsError(f"name too long: {name!r}")
    return bytes(out) + b"\x00"


def decode_name(msg: bytes, offset: int) -> tuple[str, int]:
    """The name at ``offset`` (following compression pointers) and the offset after it."""
    labels: list[str] = []
    end: int | None = None
    for _ in range(MAX_POINTERS + 128):  # every step consumes a label or a pointer
        if offset >= len(msg):
            raise DnsError("name runs past the message")
        length = msg[offset]
        if length & 0xC0 == 0xC0:
            if offset + 1 >= len(msg):
                raise DnsError("truncated compression pointer")
            if end is None:
                end = offset + 2
            offset = ((length & 0x3F) << 8) | msg[offset + 1]
            continue
        if length & 0xC0:
            raise DnsError("unknown label type")
        if length == 0:
            return ".".join(labels), end if end is not None else offset + 1
        label = msg[offset + 1 : offset + 1 + length]
        if len(label) != length:
            raise DnsError("label runs past the message")
        labels.append(label.decode("ascii", "replace"))
        offset += 1 + length
    raise DnsError("compression loop")


@dataclass(frozen=True)
class Question:
    name: str
    qtype: int
    qclass: int = CLASS_IN


@dataclass(frozen=True)
class Record:
    name: str
    rtype: int
    rclass: int
    ttl: int
    rdata: bytes

    @property
    def value(self) -> str:
        """The address of an A or AAAA record, else the rdata in hex."""
        if self.rtype == TYPES["A"] and len(self.rdata) == 4:
            return socket.inet_ntop(socket.AF_INET, self.rdata)
        if self.rtype == TYPES["AAAA"] and len(self.rdata) == 16:
            return socket.inet_ntop(socket.AF_INET6, self.rdata)
        return self.rdata.hex()


@dataclass
class Message:
    id: int
    flags: int
    questions: list[Question] = field(default_factory=list)
    answers: list[Record] = field(default_factory=list)
    authority: list[Record] = field(default_factory=list)
    additional: list[Record] = field(default_factory=list)

    @property
    def rcode(self) -> str:
        return RCODES.get(self.flags & 0xF, f"RCODE{self.flags & 0xF}")

    @property
    def authoritative(self) -> bool:
        return bool(self.flags & FLAG_AA)

    @property
    def addresses(self) -> list[str]:
        """The A and AAAA answers, in order."""
        wanted = (TYPES["A"], TYPES["AAAA"])
        return [record.value for record in self.answers if record.rtype in wanted]


def parse_message(msg: bytes) -> Message:
    if len(msg) < HEADER.size:
        raise DnsError("shorter than a DNS header")
    ident, flags, qd, an, ns, ar = HEADER.unpack_from(msg)
    message = Message(ident, flags)
    offset = HEADER.size
    for _ in range(qd):
        name, offset = decode_name(msg, offset)
        if offset + 4 > len(msg):
            raise DnsError("truncated question")
        qtype, qclass = struct.unpack_from("!HH", msg, offset)
        offset += 4
        message.questions.append(Question(name, qtype, qclass))
    for section, count in (
        (message.answers, an),
        (message.authority, ns),
        (message.additional, ar),
    ):
        for _ in range(count):
            name, offset = decode_name(msg, offset)
            if offset + RR_FIXED.size > len(msg):
                raise DnsError("truncated record")
            rtype, rclass, ttl, length = RR_FIXED.unpack_from(msg, offset)
            offset += RR_FIXED.size
            rdata = msg[offset : offset + length]
            if len(rdata) != length:
                raise DnsError("truncated record data")
            offset += length
            section.append(Record(name, rtype, rclass, ttl, rdata))
    return message


def build_query(name: str, qtype: str | int = "A", ident: int | None = None) -> bytes:
    """A recursion-desired query for ``name``."""
    ident = int.from_bytes(os.urandom(2), "big") if ident is None else ident
    header = HEADER.pack(ident, FLAG_RD, 1, 0, 0, 0)
    return header + encode_name(name) + struct.pack("!HH", type_code(qtype), CLASS_IN)


# --- the zone ------------------------------------------------------------------------------------


@dataclass
class Zone:
    """Address records of one zone: ``{name: {"A": [...], "AAAA": [...]}}`` (names below origin)."""

    origin: str
    records: Mapping[str, Mapping[str, Sequence[str]]]

    def contains(self, name: str) -> bool:
        name, origin = normalize(name), normalize(self.origin)
        return name == origin or name.endswith("." + origin)

    def exists(self, name: str) -> bool:
        name = normalize(name)
        return name == normalize(self.origin) or name in self._names()

    def _names(self) -> dict[str, Mapping[str, Sequence[str]]]:
        return {normalize(name): types for name, types in self.records.items()}

    def lookup(self, name: str, qtype: int) -> list[tuple[int, bytes]]:
        """(type, rdata) of the records of ``name`` answering ``qtype``."""
        found: list[tuple[int, bytes]] = []
        for type_, values in self._names().get(normalize(name), {}).items():
            code = type_code(type_)
            if qtype not in (code, TYPES["ANY"]):
                continue
            found += [(code, ipaddress.ip_address(value).packed) for value in values]
        if qtype in (TYPES["SOA"], TYPES["ANY"]) and normalize(name) == normalize(self.origin):
            found.append((TYPES["SOA"], self.soa_rdata()))
        return found

    def soa_rdata(self) -> bytes:
        return (
            encode_name(f"ns.{self.origin}")
            + encode_name(f"hostmaster.{self.origin}")
            + struct.pack("!IIIII", 1, 3600, 600, 86400, TTL)
        )


def braid_zone(
    target_v4: str = "198.19.0.1", target_v6: str = "2001:db8:ff::1", origin: str = "braid.test"
) -> Zone:
    """The world's zone: files.<origin> (A and AAAA), v6only.<origin> (AAAA only)."""
    return Zone(
        origin,
        {
            f"files.{origin}": {"A": [target_v4], "AAAA": [target_v6]},
            f"v6only.{origin}": {"AAAA": [target_v6]},
        },
    )


def answer(zone: Zone, query: bytes) -> tuple[bytes | None, dict[str, Any]]:
    """The response to ``query`` (None: not worth one) and what to log about it."""
    info: dict[str, Any] = {"qname": None, "qtype": None, "rcode": None, "answers": 0}
    if len(query) < HEADER.size:
        return None, info
    ident, flags, qd, _an, _ns, _ar = HEADER.unpack_from(query)
    if flags & FLAG_QR:
        return None, info  # a response: never answer those
    flags = FLAG_QR | (flags & (OPCODE_MASK | FLAG_RD)) | FLAG_RA
    rcode, question, body, an, ns = 0, b"", b"", 0, 0
    if flags & OPCODE_MASK:
        rcode = 4
    elif qd != 1:
        rcode = 1
    else:
        try:
            name, end = decode_name(query, HEADER.size)
            if end + 4 > len(query):
                raise DnsError("truncated question")
            qtype, qclass = struct.unpack_from("!HH", query, end)
        except DnsError:
            name, qtype, qclass, rcode = "", 0, 0, 1
        if rcode == 0:
            info.update(qname=normalize(name), qtype=type_name(qtype))
            # Written out plainly (the query may have used compression): answers point at it.
            question = encode_name(name) + struct.pack("!HH", qtype, qclass)
            rcode, body, an, ns = _resolve(zone, name, qtype, qclass)
            if qclass == CLASS_IN and zone.contains(name):
                flags |= FLAG_AA
    info.update(rcode=RCODES[rcode], answers=an)
    header = HEADER.pack(ident, flags | rcode, 1 if question else 0, an, ns, 0)
    return header + question + body, info


def _resolve(zone: Zone, name: str, qtype: int, qclass: int) -> tuple[int, bytes, int, int]:
    """(rcode, the sections after the question, answer count, authority count)."""
    if qclass != CLASS_IN or not zone.contains(name):
        return 5, b"", 0, 0
    if not zone.exists(name):
        return 3, _soa(zone), 0, 1
    found = zone.lookup(name, qtype)
    if not found:
        return 0, _soa(zone), 0, 1
    body = b"".join(
        b"\xc0\x0c" + RR_FIXED.pack(rtype, CLASS_IN, TTL, len(rdata)) + rdata
        for rtype, rdata in found
    )
    return 0, body, len(found), 0


def _soa(zone: Zone) -> bytes:
    rdata = zone.soa_rdata()
    return encode_name(zone.origin) + RR_FIXED.pack(TYPES["SOA"], CLASS_IN, TTL, len(rdata)) + rdata


# --- the server ----------------------------------------------------------------------------------


def _plain(address: str) -> str:
    return address[7:] if address.startswith("::ffff:") and "." in address else address


class DnsServer:
    """Serves ``zone`` on UDP and TCP at each of ``addresses``, one daemon thread per socket (and
    per TCP client). ``port`` 0 picks one free port, the same for every socket when possible."""

    def __init__(
        self,
        addresses: Sequence[str],
        port: int = 53,
        zone: Zone | None = None,
        log: Logger | None = None,
    ) -> None:
        self.zone = zone or braid_zone()
        self._log = log
        self._sockets: list[tuple[str, socket.socket]] = []
        self._threads: list[threading.Thread] = []
        self._clients = threading.BoundedSemaphore(MAX_TCP_CLIENTS)
        try:
            for address in addresses:
                family = socket.AF_INET6 if ":" in address else socket.AF_INET
                udp = socket.socket(family, socket.SOCK_DGRAM)
                self._sockets.append(("udp", udp))
                udp.bind((address, port))
                port = port or udp.getsockname()[1]
                tcp = socket.socket(family, socket.SOCK_STREAM)
                self._sockets.append(("tcp", tcp))
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((address, port))
                tcp.listen(64)
        except BaseException:
            self.close()
            raise
        self.port = port

    def start(self) -> DnsServer:
        for transport, sock in self._sockets:
            serve = self._serve_udp if transport == "udp" else self._serve_tcp
            thread = threading.Thread(target=serve, args=(sock,), name=f"dns-{transport}")
            thread.daemon = True
            thread.start()
            self._threads.append(thread)
        return self

    def close(self) -> None:
        for _transport, sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _handle(
        self, query: bytes, peer: tuple[Any, ...], local: str, transport: str
    ) -> bytes | None:
        response, info = answer(self.zone, query)
        if self._log is not None and info["qname"] is not None:
            try:
                self._log(
                    time=round(time.time(), 6),
                    client=_plain(peer[0]),
                    port=peer[1],
                    server=local,
                    transport=transport,
                    **info,
                )
            except Exception:
                log.exception("dns log")
        return response

    def _serve_udp(self, sock: socket.socket) -> None:
        local = sock.getsockname()[0]
        while True:
            try:
                query, peer = sock.recvfrom(65535)
            except OSError:
                if sock.fileno() < 0:
                    return
                continue
            response = self._handle(query, peer, local, "udp")
            if response is not None:
                with contextlib.suppress(OSError):
                    sock.sendto(response, peer)

    def _serve_tcp(self, listener: socket.socket) -> None:
        while True:
            try:
                client, peer = listener.accept()
            except OSError:
                if listener.fileno() < 0:
                    return
                continue
            if not self._clients.acquire(blocking=False):
                client.close()
                continue
            thread = threading.Thread(
                target=self._serve_client, args=(client, peer), name="dns-tcp-client", daemon=True
            )
            thread.start()

    def _serve_client(self, client: socket.socket, peer: tuple[Any, ...]) -> None:
        local = client.getsockname()[0]
        try:
            with client:
                client.settimeout(TCP_IDLE_TIMEOUT)
                for _ in range(MAX_TCP_QUERIES):
                    head = _recv_exact(client, 2)
                    if head is None:
                        return
                    query = _recv_exact(client, int.from_bytes(head, "big"))
                    if query is None:
                        return
                    response = self._handle(query, peer, local, "tcp")
                    if response is None:
                        return
                    client.sendall(len(response).to_bytes(2, "big") + response)
        except OSError as exc:
            log.debug("dns tcp client %s: %s", peer[0], exc)
        finally:
            self._clients.release()


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """n bytes, or None if the peer closed first."""
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


# --- the client ----------------------------------------------------------------------------------


def query(
    server: str,
    name: str,
    qtype: str | int = "A",
    *,
    port: int = 53,
    transport: str = "udp",
    device: str | None = None,
    bind: str | None = None,
    timeout: float = 2.0,
) -> Message:
    """Ask ``server`` one question over ``transport`` ("udp" or "tcp"), optionally bound to a
    device (SO_BINDTODEVICE) and/or source address.

    Raises :class:`TimeoutError` when no answer comes within ``timeout`` seconds, another
    :class:`OSError` when the server refuses (ICMP port unreachable, TCP reset), or
    :class:`DnsError` for a garbled answer.
    """
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    if transport not in ("udp", "tcp"):
        raise ValueError(f"transport must be udp or tcp, not {transport!r}")
    request = build_query(name, qtype)
    ident = HEADER.unpack_from(request)[0]
    deadline = time.monotonic() + timeout
    with socket.socket(family, kind) as sock:
        if device:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        if bind is not None:
            sock.bind((bind, 0))
        sock.settimeout(timeout)
        sock.connect((server, port))
        if transport == "tcp":
            sock.sendall(len(request).to_bytes(2, "big") + request)
            head = _recv_exact(sock, 2)
            body = _recv_exact(sock, int.from_bytes(head, "big")) if head else None
            if body is None:
                raise DnsError("the server closed the connection without an answer")
            return parse_message(body)
        sock.send(request)
        while True:  # skip stray datagrams; bounded by the deadline
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer from {server} within {timeout:g} s")
            sock.settimeout(left)
            data = sock.recv(65535)
            if len(data) >= 2 and int.from_bytes(data[:2], "big") == ident:
                return parse_message(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m braid.netbed.dns", description=__doc__)
    parser.add_argument("server")
    parser.add_argument("name")
    parser.add_argument("qtype", nargs="?", default="A")
    parser.add_argument("--tcp", action="store_true", help="ask over TCP (default: UDP)")
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument("--device", help="leave through this interface (SO_BINDTODEVICE)")
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    try:
        reply = query(
            args.server,
            args.name,
            args.qtype,
            port=args.port,
            transport="tcp" if args.tcp else "udp",
            device=args.device,
            timeout=args.timeout,
        )
    except (OSError, DnsError) as exc:
        print(json.dumps({"error": str(exc) or type(exc).__name__}), flush=True)
        return 2
    result = {
        "rcode": reply.rcode,
        "authoritative": reply.authoritative,
        "addresses": reply.addresses,
    }
    print(json.dumps(result), flush=True)
    return 0 if reply.rcode == "NOERROR" else 1


if __name__ == "__main__":
    sys.exit(main())
