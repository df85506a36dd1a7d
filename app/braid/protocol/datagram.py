"""The datagram path: UDP flows as sealed datagrams over per-link UDP to braid-server (sans-IO).

A session is agreed over an authenticated tunnel connection (Command.DATAGRAM): the server
answers with a session id and a fresh 256-bit key, and the session lives as long as that
connection. Every packet then travels on the server's UDP port (the one the health probes use)
or, where UDP to the server does not get through, as a frame on that same connection::

    header  "BD" | session id 8 | seq u64                          (18 bytes, authenticated)
    sealed  ChaCha20-Poly1305(key, nonce = direction u32 | seq u64, aad = header)
    plain   kind u8 | link u8 | down u8 | stamp u32 | echo u32 | hold u32
            DATA: flow u32 | number u32 | address (up only, SOCKS5 encoding) | payload
            CLOSE: flow u32 | number u32 (unused)
            PING: room u16 (the largest packet the link takes, so answers fit it too)

``seq`` is per packet and per direction, never reused (it is the nonce): the receiver keeps a
window of the sequence numbers it has accepted and drops replays. ``number`` is per datagram:
the copies of one datagram sent on two links share it and differ in ``seq``, so the receiver
delivers the first copy and drops the others (the same window, over numbers).

``link`` is the sender's link (255: the tunnel); ``down`` is, upward, the set of links (a bit per
link number) the client wants this flow's answers on (0: the tunnel). ``stamp`` is the sender's
clock in microseconds; the server echoes the latest stamp it got on a link, with how long it held
it, in what it sends back on that link, which gives the client each link's round trip under the
load it carries.
"""

from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from braid.protocol.address import Address, AddressError, decode_address, encode_address

MAGIC = b"BD"
SESSION_ID_SIZE = 8
KEY_SIZE = 32
TAG_SIZE = 16
TUNNEL_LINK = 255
MAX_LINKS = 8  # links that fit the ``down`` bit set
_HEADER = struct.Struct("!2s8sQ")
_PLAIN = struct.Struct("!BBBIII")
_DATA = struct.Struct("!II")
HEADER_SIZE = _HEADER.size
OVERHEAD = _HEADER.size + TAG_SIZE + _PLAIN.size + _DATA.size  # plus the address going up
UP, DOWN = 0, 1
WINDOW = 4096
STAMP_MASK = 0xFFFFFFFF
#: A session's grant over the tunnel: session id and key.
GRANT = struct.Struct(f"!{SESSION_ID_SIZE}s{KEY_SIZE}s")


class Kind(enum.IntEnum):
    DATA = 1
    PING = 2  # client -> server on one link: is it open? (also keeps the NAT binding)
    PONG = 3  # the answer, on the same link, never larger than the PING
    CLOSE = 4  # client -> server: the flow is over, release its socket (flow field only)


@dataclass(frozen=True, slots=True)
class Packet:
    kind: Kind
    link: int
    down: int = 0
    stamp: int = 0
    echo: int = 0
    hold: int = 0
    flow: int = 0
    number: int = 0
    address: Address | None = None
    payload: bytes = b""


def looks_like_datagram(data: bytes) -> bool:
    """The magic and room for a header and tag, before any cryptography."""
    return len(data) >= _HEADER.size + TAG_SIZE + _PLAIN.size and data[:2] == MAGIC


def session_id_of(data: bytes) -> bytes:
    return data[2 : 2 + SESSION_ID_SIZE]


def new_grant() -> tuple[bytes, bytes]:
    """A fresh session id and key."""
    return os.urandom(SESSION_ID_SIZE), ChaCha20Poly1305.generate_key()


class Sealer:
    """Seals and opens one session's packets in one direction each."""

    def __init__(self, session_id: bytes, key: bytes, sending: int) -> None:
        if len(session_id) != SESSION_ID_SIZE or len(key) != KEY_SIZE:
            raise ValueError("a session id of 8 bytes and a key of 32")
        self.session_id = session_id
        self._aead = ChaCha20Poly1305(key)
        self._sending = sending
        self._receiving = DOWN if sending == UP else UP
        self._seq = 0

    def seal(self, packet: Packet) -> bytes:
        self._seq += 1
        header = _HEADER.pack(MAGIC, self.session_id, self._seq)
        nonce = struct.pack("!IQ", self._sending, self._seq)
        return header + self._aead.encrypt(nonce, encode_plain(packet), header)

    def open(self, data: bytes) -> tuple[int, Packet] | None:
        """(seq, packet) if ``data`` is authentic for this session; None otherwise.

        The caller checks ``seq`` against its replay window *after* this, so a forgery can never
        move the window.
        """
        if not looks_like_datagram(data) or session_id_of(data) != self.session_id:
            return None
        header = data[: _HEADER.size]
        seq = _HEADER.unpack(header)[2]
        nonce = struct.pack("!IQ", self._receiving, seq)
        try:
            plain = self._aead.decrypt(nonce, data[_HEADER.size :], header)
        except InvalidTag:
            return None
        packet = decode_plain(plain, with_address=self._receiving == UP)
        return None if packet is None else (seq, packet)


def encode_plain(packet: Packet) -> bytes:
    head = _PLAIN.pack(
        packet.kind,
        packet.link,
        packet.down,
        packet.stamp & STAMP_MASK,
        packet.echo & STAMP_MASK,
        min(packet.hold, STAMP_MASK),
    )
    if packet.kind not in (Kind.DATA, Kind.CLOSE):
        return head + packet.payload  # PING padding
    body = _DATA.pack(packet.flow, packet.number)
    if packet.kind == Kind.CLOSE:
        return head + body
    if packet.address is not None:
        body += encode_address(packet.address)
    return head + body + packet.payload


def decode_plain(plain: bytes, with_address: bool) -> Packet | None:
    if len(plain) < _PLAIN.size:
        return None
    kind, link, down, stamp, echo, hold = _PLAIN.unpack_from(plain)
    if kind not in Kind._value2member_map_:
        return None
    kind = Kind(kind)
    if kind not in (Kind.DATA, Kind.CLOSE):
        return Packet(kind, link, down, stamp, echo, hold, payload=plain[_PLAIN.size :])
    if len(plain) < _PLAIN.size + _DATA.size:
        return None
    flow, number = _DATA.unpack_from(plain, _PLAIN.size)
    end = _PLAIN.size + _DATA.size
    address = None
    if kind == Kind.CLOSE:
        return Packet(kind, link, down, stamp, echo, hold, flow, number)
    if with_address:
        try:
            decoded = decode_address(plain, end)
        except (AddressError, ValueError):
            return None
        if decoded is None:
            return None
        address, end = decoded
    return Packet(kind, link, down, stamp, echo, hold, flow, number, address, plain[end:])


class ReplayWindow:
    """Which numbers were seen, over the latest ``size``: each is accepted once.

    A number older than the window is refused (it may have been seen and forgotten), as
    WireGuard and IPsec do; within the window, out-of-order arrival is fine.
    """

    def __init__(self, size: int = WINDOW) -> None:
        self.size = size
        self.top = 0  # the highest number accepted
        self._bits = 0  # bit i: top - i was seen

    def check(self, number: int) -> bool:
        """Accept ``number`` (True) if new and not too old, and remember it."""
        if number <= 0:
            return False
        if number > self.top:
            shift = number - self.top
            self._bits = (
                ((self._bits << shift) | 1) & ((1 << self.size) - 1) if shift < self.size else 1
            )
            self.top = number
            return True
        offset = self.top - number
        if offset >= self.size or self._bits >> offset & 1:
            return False
        self._bits |= 1 << offset
        return True


ROOM = struct.Struct("!H")
DEFAULT_ROOM = 1472  # Ethernet's 1500 less IPv4 and UDP headers, while a link has not said


def ping_room(payload: bytes) -> int | None:
    """The room a PING announces, if any."""
    return ROOM.unpack_from(payload)[0] if len(payload) >= ROOM.size else None


def stamp_us(ns: int) -> int:
    """A clock reading (ns) as a stamp: microseconds, modulo 2**32 (wraps in 71 minutes)."""
    return (ns // 1000) & STAMP_MASK


def round_trip_us(now: int, echo: int, hold: int) -> int | None:
    """The round trip a returned stamp tells, minus the peer's hold; None if meaningless."""
    if echo == 0:
        return None
    elapsed = (now - echo) & STAMP_MASK
    rtt = elapsed - hold
    if rtt < 0 or rtt > 10_000_000:
        return None
    return rtt


def pack_grant(session_id: bytes, key: bytes) -> bytes:
    return GRANT.pack(session_id, key)


def unpack_grant(data: bytes) -> tuple[bytes, bytes] | None:
    if len(data) != GRANT.size:
        return None
    return GRANT.unpack(data)


__all__ = [
    "DEFAULT_ROOM",
    "DOWN",
    "GRANT",
    "HEADER_SIZE",
    "MAGIC",
    "OVERHEAD",
    "TUNNEL_LINK",
    "UP",
    "Kind",
    "Packet",
    "ReplayWindow",
    "Sealer",
    "decode_plain",
    "encode_plain",
    "looks_like_datagram",
    "new_grant",
    "pack_grant",
    "ping_room",
    "round_trip_us",
    "session_id_of",
    "stamp_us",
    "unpack_grant",
]
