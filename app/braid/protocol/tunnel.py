"""The tunnel protocol spoken inside TLS between the laptop and braid-server.

Sans-IO: functions turn messages into bytes and parsers turn bytes into
messages; no socket is touched here. One tunnel connection carries one flow:

    client                                  server
    HELLO  = "BRAID" ver len token   ->
                                     <-     AUTH_OK = "BRAID" ver 0
    (the connection may now wait, warm, in the client's pool)
    REQUEST = cmd address            ->
                                     <-     REPLY = code address
    FRAME* (u16 length, data)        <->    FRAME*
    FRAME of length 0 = end of stream in that direction (TLS cannot half-close)

Commands: CONNECT carries a TCP byte stream to the address. UDP carries
datagrams to and from the address, one datagram per frame (the session ends
with the end-of-stream frame or when idle). DNS carries DNS messages, one per
frame, that the server answers through its own resolver; the address is
ignored (send 0.0.0.0:53). Replies come back in any order; the client matches
them by the DNS message id. SPEEDTEST measures the tunnel itself: the server
sends or sinks data of its own within caps (see braid.protocol.speedtest); the
address is ignored.

A server that does not accept the HELLO closes the connection without a
byte, so an unauthenticated peer learns nothing about it.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from braid.protocol.address import Address, AddressError, decode_address, encode_address

MAGIC = b"BRAID"
VERSION = 1
TOKEN_MAX = 255
FRAME_MAX = 0xFFFF
EOF_FRAME = b"\x00\x00"


class ProtocolError(ValueError):
    """The peer sent bytes that are not this protocol."""


class Command(enum.IntEnum):
    CONNECT = 1
    UDP = 3
    DNS = 4
    DATAGRAM = 5  # a datagram-path session (braid.protocol.datagram); the address is ignored
    SPEEDTEST = 6  # a bounded speed test against the server itself (braid.protocol.speedtest)
    INFO = 7  # the server's version and MPTCP limits: one JSON data frame, then the end


class Reply(enum.IntEnum):
    """Outcome of a request; the values are SOCKS5's reply codes on purpose."""

    SUCCEEDED = 0
    GENERAL_FAILURE = 1
    NOT_ALLOWED = 2
    NETWORK_UNREACHABLE = 3
    HOST_UNREACHABLE = 4
    CONNECTION_REFUSED = 5
    TIMED_OUT = 6
    COMMAND_NOT_SUPPORTED = 7
    ADDRESS_TYPE_NOT_SUPPORTED = 8

    def describe(self) -> str:
        return _REPLY_TEXT[self]


_REPLY_TEXT = {
    Reply.SUCCEEDED: "connected",
    Reply.GENERAL_FAILURE: "the server could not reach the destination",
    Reply.NOT_ALLOWED: "the server's policy refuses this destination",
    Reply.NETWORK_UNREACHABLE: "the destination network is unreachable from the server",
    Reply.HOST_UNREACHABLE: "the destination host is unreachable or its name does not resolve",
    Reply.CONNECTION_REFUSED: "the destination refused the connection",
    Reply.TIMED_OUT: "the destination did not answer in time",
    Reply.COMMAND_NOT_SUPPORTED: "the server does not support this request",
    Reply.ADDRESS_TYPE_NOT_SUPPORTED: "the address type is not supported",
}


@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    token: bytes


@dataclass(frozen=True, slots=True)
class Request:
    command: Command
    address: Address


@dataclass(frozen=True, slots=True)
class ReplyMessage:
    code: Reply
    address: Address


def encode_hello(token: str | bytes) -> bytes:
    raw = token.encode("ascii") if isinstance(token, str) else token
    if not 0 < len(raw) <= TOKEN_MAX:
        raise ValueError("token must be 1 to 255 bytes")
    return MAGIC + bytes([VERSION, len(raw)]) + raw


def parse_hello(buf: bytes | bytearray) -> tuple[Hello, int] | None:
    """Parse a HELLO; None if more bytes are needed. Raises ProtocolError."""
    head = len(MAGIC) + 2
    if len(buf) < len(MAGIC):
        if not MAGIC.startswith(bytes(buf)):
            raise ProtocolError("not a Braid client")
        return None
    if bytes(buf[: len(MAGIC)]) != MAGIC:
        raise ProtocolError("not a Braid client")
    if len(buf) < head:
        return None
    version, length = buf[len(MAGIC)], buf[len(MAGIC) + 1]
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}")
    if length == 0:
        raise ProtocolError("empty token")
    if len(buf) < head + length:
        return None
    return Hello(version, bytes(buf[head : head + length])), head + length


AUTH_OK = MAGIC + bytes([VERSION, 0])


def parse_auth_reply(buf: bytes | bytearray) -> int | None:
    """Bytes consumed by a valid AUTH_OK, None if incomplete. Raises ProtocolError."""
    if len(buf) < len(AUTH_OK):
        if not AUTH_OK.startswith(bytes(buf)):
            raise ProtocolError("the server's answer is not Braid's protocol")
        return None
    if bytes(buf[: len(AUTH_OK)]) != AUTH_OK:
        raise ProtocolError("the server's answer is not Braid's protocol")
    return len(AUTH_OK)


def encode_request(command: Command, address: Address) -> bytes:
    return bytes([command]) + encode_address(address)


def _parse_tagged_address(buf: bytes | bytearray, tags, what: str):
    """A one-byte tag (command or reply code) then an address; None if incomplete."""
    if not buf:
        return None
    try:
        tag = tags(buf[0])
    except ValueError:
        raise ProtocolError(f"unknown {what} {buf[0]}") from None
    try:
        decoded = decode_address(buf, 1)
    except AddressError as exc:
        raise ProtocolError(str(exc)) from None
    if decoded is None:
        return None
    address, end = decoded
    return tag, address, end


def parse_request(buf: bytes | bytearray) -> tuple[Request, int] | None:
    parsed = _parse_tagged_address(buf, Command, "command")
    if parsed is None:
        return None
    command, address, end = parsed
    return Request(command, address), end


def encode_reply(code: Reply, address: Address | None = None) -> bytes:
    return bytes([code]) + encode_address(address or Address("0.0.0.0", 0))


def parse_reply(buf: bytes | bytearray) -> tuple[ReplyMessage, int] | None:
    parsed = _parse_tagged_address(buf, Reply, "reply code")
    if parsed is None:
        return None
    code, address, end = parsed
    return ReplyMessage(code, address), end


def frame_header(length: int) -> bytes:
    if not 0 < length <= FRAME_MAX:
        raise ValueError(f"frame length out of range: {length}")
    return struct.pack("!H", length)


class FrameDecoder:
    """Splits the framed byte stream back into data chunks.

    ``feed`` returns the payloads now complete; ``eof`` turns true once the
    end-of-stream frame has been seen, and nothing may follow it.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.eof = False

    def feed(self, data: bytes) -> list[bytes]:
        if self.eof:
            if data:
                raise ProtocolError("data after end of stream")
            return []
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos = 0
        size = len(buf)
        with memoryview(buf) as view:  # slices of a view are copied once, not twice
            while size - pos >= 2:
                length = (buf[pos] << 8) | buf[pos + 1]
                if length == 0:
                    self.eof = True
                    if size - pos > 2:
                        raise ProtocolError("data after end of stream")
                    pos += 2
                    break
                if size - pos - 2 < length:
                    break
                out.append(bytes(view[pos + 2 : pos + 2 + length]))
                pos += 2 + length
        del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)
