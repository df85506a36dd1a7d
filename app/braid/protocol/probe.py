"""Link health probes: an authenticated UDP echo between braidd and braid-server (sans-IO).

braidd sends one request per link every few hundred milliseconds to the server's
listening port (the same number as its TCP port, over UDP); the server answers
each authentic request with a reply of exactly the same size, so it can never
amplify traffic, and answers nothing else::

    "BRP2" | type u8 | link u8 | seq u32 | stamp u64 | sent u64 | nonce 8 | mac 16   (50 bytes)

``stamp`` is the client's monotonic clock in nanoseconds, echoed by the server;
``sent`` is the client's wall clock (Unix time in milliseconds): the server answers
only requests within ``WINDOW_MS`` of its own clock, so it needs to remember the
requests it answered for that long only, and a capture replayed later gets nothing.
``mac`` is HMAC-SHA256 over everything before it, cut to 16 bytes. The key is the
SHA-256 of the device's token: the server stores exactly that hash (never the
token), the client hashes the token it has, so both can compute it.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
import time
from dataclasses import dataclass

MAGIC = b"BRP2"
SIZE = 50
MAC_SIZE = 16
NONCE_SIZE = 8
WINDOW_MS = 30_000  # how far the client's clock may be from the server's, either way
_HEADER = struct.Struct("!4sBBIQQ8s")  # magic, type, link, seq, stamp, sent, nonce: 34 bytes


class ProbeType(enum.IntEnum):
    REQUEST = 1
    REPLY = 2


@dataclass(frozen=True, slots=True)
class Probe:
    type: ProbeType
    link: int  # the client's link number, 0..255
    seq: int  # 0..2**32-1
    stamp: int  # the client's monotonic clock in ns when it sent the request
    nonce: bytes  # 8 random bytes: no two requests are alike, so replays can be spotted
    sent_ms: int = 0  # the client's wall clock when it sent the request, Unix ms


def key_from_token(token: str | bytes) -> bytes:
    """The probe key on the client: SHA-256 of the token it was paired with."""
    raw = token.encode() if isinstance(token, str) else token
    return hashlib.sha256(raw).digest()


def key_from_hash(token_sha256: str) -> bytes:
    """The probe key on the server: the stored hex SHA-256 of the token."""
    return bytes.fromhex(token_sha256)


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.digest(key, body, "sha256")[:MAC_SIZE]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _encode(
    key: bytes, kind: ProbeType, link: int, seq: int, stamp: int, nonce: bytes, sent_ms: int
) -> bytes:
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"the nonce must be {NONCE_SIZE} bytes")
    try:
        body = _HEADER.pack(MAGIC, kind, link, seq, stamp, sent_ms, nonce)
    except struct.error as exc:
        raise ValueError(f"a probe field is out of range: {exc}") from None
    return body + _mac(key, body)


def encode_request(
    key: bytes, link: int, seq: int, stamp: int, nonce: bytes, sent_ms: int | None = None
) -> bytes:
    """A request sent now (``sent_ms`` defaults to the wall clock)."""
    sent = now_ms() if sent_ms is None else sent_ms
    return _encode(key, ProbeType.REQUEST, link, seq, stamp, nonce, sent)


def encode_reply(key: bytes, probe: Probe) -> bytes:
    """The answer to ``probe``: the same fields, type REPLY, a fresh MAC, the same size."""
    return _encode(
        key, ProbeType.REPLY, probe.link, probe.seq, probe.stamp, probe.nonce, probe.sent_ms
    )


def is_fresh(probe: Probe, now: int | None = None) -> bool:
    """Whether ``probe`` was sent within WINDOW_MS of ``now`` (the wall clock, Unix ms)."""
    return abs((now_ms() if now is None else now) - probe.sent_ms) <= WINDOW_MS


def looks_like_probe(data: bytes) -> bool:
    """Right size and magic, before any cryptography: cheap to reject stray datagrams."""
    return len(data) == SIZE and data.startswith(MAGIC)


def parse(key: bytes, data: bytes) -> Probe | None:
    """The probe in ``data`` if it is authentic under ``key``; None for anything else."""
    if not looks_like_probe(data):
        return None
    body, mac = data[: _HEADER.size], data[_HEADER.size :]
    if not hmac.compare_digest(mac, _mac(key, body)):
        return None
    _, kind, link, seq, stamp, sent_ms, nonce = _HEADER.unpack(body)
    if kind not in ProbeType._value2member_map_:
        return None
    return Probe(ProbeType(kind), link, seq, stamp, nonce, sent_ms)


__all__ = [
    "MAGIC",
    "SIZE",
    "WINDOW_MS",
    "Probe",
    "ProbeType",
    "encode_reply",
    "encode_request",
    "is_fresh",
    "key_from_hash",
    "key_from_token",
    "looks_like_probe",
    "now_ms",
    "parse",
]
