"""The speed test's messages inside a SPEEDTEST tunnel (sans-IO).

A speed test measures the way to braid-server itself, so it needs no destination and costs
nobody else anything:

    client                                     server
    REQUEST SPEEDTEST 0.0.0.0:0  ->
    FRAME  ASK = "S" direction bytes ms  ->    (pipelined behind the REQUEST)
                                     <-        REPLY SUCCEEDED
                                     <-        FRAME GRANT = "G" status bytes ms retry_after
    down:                            <-        FRAME* of the server's own data, then the end frame
    up:    FRAME* of data  ->        <-        FRAME REPORT = "R" bytes ms, every REPORT_INTERVAL
                                               (what it received so far, and since when)

The receiver measures: the laptop times a download's frames as they arrive, the server times
an upload's and reports; what a sender has merely queued says nothing about the path. The
server grants at most what its caps allow (see braid.server.speedtest), and stops at the
granted bytes or time whatever the client does. Either end may then close the tunnel.

A server older than SPEEDTEST answers the REQUEST with COMMAND_NOT_SUPPORTED.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from braid.protocol.tunnel import ProtocolError

#: How often the server reports what an upload has brought so far.
REPORT_INTERVAL = 0.1

_ASK = struct.Struct("!cBQI")  # "S", direction, bytes, milliseconds
_GRANT = struct.Struct("!cBQII")  # "G", status, bytes, milliseconds, retry after (s)
_REPORT = struct.Struct("!cQI")  # "R", bytes received, milliseconds since the first


class Direction(enum.IntEnum):
    DOWN = 1  # the server sends
    UP = 2  # the client sends


class Status(enum.IntEnum):
    GRANTED = 0
    BUSY = 1  # too many speed tests run now (this device's or the server's)
    ALLOWANCE = 2  # this device used its speed-test allowance; retry_after says when it returns
    BAD_REQUEST = 3

    def describe(self, retry_after: int = 0) -> str:
        if self is Status.BUSY:
            return "the server is running as many speed tests as it allows; try again shortly"
        if self is Status.ALLOWANCE:
            minutes = max(1, round(retry_after / 60))
            return (
                "this device used up its speed-test allowance on the server; "
                f"try again in about {minutes} min"
            )
        if self is Status.BAD_REQUEST:
            return "the server did not understand the speed-test request"
        return "granted"


@dataclass(frozen=True, slots=True)
class Ask:
    direction: Direction
    bytes: int
    ms: int


@dataclass(frozen=True, slots=True)
class Grant:
    status: Status
    bytes: int = 0
    ms: int = 0
    retry_after: int = 0  # seconds, for ALLOWANCE


@dataclass(frozen=True, slots=True)
class Report:
    bytes: int  # received so far
    ms: int  # since the first byte arrived


def encode_ask(ask: Ask) -> bytes:
    return _ASK.pack(b"S", ask.direction, ask.bytes, ask.ms)


def parse_ask(frame: bytes) -> Ask:
    """Raises ProtocolError for anything but a well-formed ASK."""
    if len(frame) != _ASK.size or frame[:1] != b"S":
        raise ProtocolError("not a speed-test request")
    _, direction, size, ms = _ASK.unpack(frame)
    try:
        return Ask(Direction(direction), size, ms)
    except ValueError:
        raise ProtocolError(f"unknown speed-test direction {direction}") from None


def encode_grant(grant: Grant) -> bytes:
    return _GRANT.pack(b"G", grant.status, grant.bytes, grant.ms, grant.retry_after)


def parse_grant(frame: bytes) -> Grant:
    if len(frame) != _GRANT.size or frame[:1] != b"G":
        raise ProtocolError("the server's answer to the speed test is not a grant")
    _, status, size, ms, retry = _GRANT.unpack(frame)
    try:
        return Grant(Status(status), size, ms, retry)
    except ValueError:
        raise ProtocolError(f"unknown speed-test status {status}") from None


def encode_report(report: Report) -> bytes:
    return _REPORT.pack(b"R", report.bytes, report.ms)


def parse_report(frame: bytes) -> Report:
    if len(frame) != _REPORT.size or frame[:1] != b"R":
        raise ProtocolError("the server's speed-test report is malformed")
    _, size, ms = _REPORT.unpack(frame)
    return Report(size, ms)


def steady_rate(samples: list[tuple[float, int]], warmup: float = 0.2) -> float | None:
    """Bytes per second over the steady part of a transfer (pure).

    ``samples`` are (seconds, bytes received so far) as the receiver saw them, in order. The
    first ``warmup`` share of the time (at most half a second) is left out: slow start and the
    first queue filling are not the path's rate. The rate is the least-squares slope of the
    rest, so one sample taken late (a receiver busy for a moment reads a backlog at once) moves
    it little, where the first and last samples alone would carry the whole error. None with
    fewer than two samples or no time between them.
    """
    if len(samples) < 2:
        return None
    start, end = samples[0][0], samples[-1][0]
    if end <= start:
        return None
    skip = start + min(0.5, warmup * (end - start))
    steady = [s for s in samples if s[0] >= skip]
    if len(steady) < 3:
        steady = samples
    mean_t = sum(t for t, _ in steady) / len(steady)
    mean_b = sum(b for _, b in steady) / len(steady)
    spread = sum((t - mean_t) ** 2 for t, _ in steady)
    if spread <= 0:
        return None
    return sum((t - mean_t) * (b - mean_b) for t, b in steady) / spread


__all__ = [
    "REPORT_INTERVAL",
    "Ask",
    "Direction",
    "Grant",
    "Report",
    "Status",
    "encode_ask",
    "encode_grant",
    "encode_report",
    "parse_ask",
    "parse_grant",
    "parse_report",
    "steady_rate",
]
