"""Destination addresses as SOCKS5 encodes them (RFC 1928 section 5).

The tunnel protocol reuses the same encoding, so a SOCKS5 request can be
forwarded to the server without being re-parsed into another shape.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04


class AddressError(ValueError):
    """The bytes do not hold a valid address; the reply code says why."""

    def __init__(self, message: str, reply_code: int = 0x01) -> None:
        super().__init__(message)
        self.reply_code = reply_code


@dataclass(frozen=True, slots=True)
class Address:
    """A destination: an IPv4 or IPv6 literal, or a name for the far end to resolve."""

    host: str
    port: int

    @property
    def is_name(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return True
        return False

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def encode_address(address: Address) -> bytes:
    if not 0 <= address.port <= 0xFFFF:
        raise AddressError(f"port out of range: {address.port}")
    try:
        ip = ipaddress.ip_address(address.host)
    except ValueError:
        try:
            name = address.host.encode("idna")
        except UnicodeError:  # an empty label, or one longer than 63 characters
            raise AddressError(f"not a valid host name: {address.host!r}") from None
        if not 0 < len(name) <= 255:
            raise AddressError(f"host name too long or empty: {address.host!r}") from None
        return bytes([ATYP_DOMAIN, len(name)]) + name + struct.pack("!H", address.port)
    atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
    return bytes([atyp]) + ip.packed + struct.pack("!H", address.port)


def decode_address(
    buf: bytes | bytearray | memoryview, offset: int = 0
) -> tuple[Address, int] | None:
    """Decode one address at ``offset``.

    Returns the address and the offset just past it, or None when ``buf``
    does not hold the whole address yet.
    """
    view = memoryview(buf)
    if len(view) <= offset:
        return None
    atyp = view[offset]
    if atyp == ATYP_IPV4:
        end = offset + 1 + 4 + 2
        if len(view) < end:
            return None
        host = str(ipaddress.IPv4Address(bytes(view[offset + 1 : offset + 5])))
    elif atyp == ATYP_IPV6:
        end = offset + 1 + 16 + 2
        if len(view) < end:
            return None
        host = str(ipaddress.IPv6Address(bytes(view[offset + 1 : offset + 17])))
    elif atyp == ATYP_DOMAIN:
        if len(view) < offset + 2:
            return None
        length = view[offset + 1]
        if length == 0:
            raise AddressError("empty host name", reply_code=0x08)
        end = offset + 2 + length + 2
        if len(view) < end:
            return None
        raw = bytes(view[offset + 2 : offset + 2 + length])
        try:
            host = raw.decode("idna") if raw.startswith(b"xn--") else raw.decode("ascii")
        except UnicodeError:
            raise AddressError("host name is not ASCII or IDNA", reply_code=0x08) from None
        if any(c in host for c in "\x00/ \t\r\n"):
            raise AddressError("host name has forbidden characters", reply_code=0x08)
    else:
        raise AddressError(f"unknown address type {atyp:#x}", reply_code=0x08)
    (port,) = struct.unpack_from("!H", view, end - 2)
    return Address(host, port), end
