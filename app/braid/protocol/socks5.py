"""SOCKS5 server side (RFC 1928), as a state machine over bytes.

Only the "no authentication" method is offered: the port listens on
loopback, for the user's own applications.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from braid.protocol.address import Address, AddressError, decode_address, encode_address

VERSION = 5
METHOD_NO_AUTH = 0x00
METHOD_NONE_ACCEPTABLE = 0xFF


class SocksError(ValueError):
    """The client broke the protocol; ``reply`` is what to answer before closing, if anything."""

    def __init__(self, message: str, reply: bytes = b"") -> None:
        super().__init__(message)
        self.reply = reply


class SocksCommand(enum.IntEnum):
    CONNECT = 1
    BIND = 2
    UDP_ASSOCIATE = 3


@dataclass(frozen=True, slots=True)
class SocksRequest:
    command: SocksCommand
    address: Address


class _State(enum.Enum):
    GREETING = enum.auto()
    REQUEST = enum.auto()
    DONE = enum.auto()


def encode_reply(code: int, bound: Address | None = None) -> bytes:
    return bytes([VERSION, code, 0]) + encode_address(bound or Address("0.0.0.0", 0))


class SocksServerConnection:
    """Feed bytes from the client; get bytes to send back and, at the end, the request.

    ``receive`` returns (bytes to send, request or None). Once the request is
    out, ``leftover`` holds any bytes the client sent after it (early data).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._state = _State.GREETING
        self.leftover = b""

    def receive(self, data: bytes) -> tuple[bytes, SocksRequest | None]:
        if self._state is _State.DONE:
            raise SocksError("request already parsed")
        self._buf += data
        out = b""
        if self._state is _State.GREETING:
            greeting = self._parse_greeting()
            if greeting is None:
                return out, None
            out += greeting
            self._state = _State.REQUEST
        request = self._parse_request()
        if request is None:
            return out, None
        self._state = _State.DONE
        return out, request

    def _parse_greeting(self) -> bytes | None:
        buf = self._buf
        if not buf:
            return None
        if buf[0] != VERSION:
            raise SocksError(f"not SOCKS5 (version byte {buf[0]})")
        if len(buf) < 2:
            return None
        n = buf[1]
        if len(buf) < 2 + n:
            return None
        methods = bytes(buf[2 : 2 + n])
        del buf[: 2 + n]
        if METHOD_NO_AUTH not in methods:
            raise SocksError(
                "client offers no method this proxy accepts (it needs none)",
                reply=bytes([VERSION, METHOD_NONE_ACCEPTABLE]),
            )
        return bytes([VERSION, METHOD_NO_AUTH])

    def _parse_request(self) -> SocksRequest | None:
        buf = self._buf
        if len(buf) < 4:
            return None
        if buf[0] != VERSION or buf[2] != 0:
            raise SocksError("malformed SOCKS5 request", reply=encode_reply(0x01))
        try:
            decoded = decode_address(buf, 3)
        except AddressError as exc:
            raise SocksError(str(exc), reply=encode_reply(exc.reply_code)) from None
        if decoded is None:
            return None
        address, end = decoded
        try:
            command = SocksCommand(buf[1])
        except ValueError:
            raise SocksError(f"unknown command {buf[1]}", reply=encode_reply(0x07)) from None
        self.leftover = bytes(buf[end:])
        del buf[:]
        return SocksRequest(command, address)
