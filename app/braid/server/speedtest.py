"""Command.SPEEDTEST: braid-server sends or sinks data of its own, within caps.

Only an authenticated device gets here (the request follows its HELLO and AUTH_OK), and what
it gets is bounded so that a speed test cannot turn the server into a traffic generator:

* one test moves at most :data:`MAX_BYTES` and lasts at most :data:`MAX_SECONDS`; a bigger or
  longer request is granted the cap, and the server stops there whatever the client does;
* at most :data:`PER_DEVICE` tests of one device and :data:`TOTAL` of all devices run at once;
  one more is refused as busy;
* a device may move :data:`ALLOWANCE` bytes of speed tests per :data:`WINDOW` seconds (sent and
  received together; what a test is granted is reserved while it runs, what it moved is kept);
  past that it is refused, and told when the allowance returns.

:class:`SpeedTests` decides (no I/O, a clock passed in); :func:`serve_speedtest` carries a test
out on a tunnel. The wire format is in :mod:`braid.protocol.speedtest`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from braid.protocol.session import TunnelSession
from braid.protocol.speedtest import (
    REPORT_INTERVAL,
    Ask,
    Direction,
    Grant,
    Report,
    Status,
    encode_grant,
    encode_report,
    parse_ask,
)
from braid.protocol.tunnel import (
    EOF_FRAME,
    FRAME_MAX,
    FrameDecoder,
    ProtocolError,
    Reply,
    frame_header,
)
from braid.transport import READ_SIZE, close_writer

log = logging.getLogger(__name__)

MAX_BYTES = 64 * 1024 * 1024  # per test (one direction)
MAX_SECONDS = 5.0  # per test
PER_DEVICE = 2  # tests of one device at once
TOTAL = 4  # tests at once on the server
ALLOWANCE = 1024 * 1024 * 1024  # bytes per device per WINDOW
WINDOW = 3600.0
MIN_GRANT = 1024 * 1024  # less allowance left than this: refused rather than a useless test
ASK_TIMEOUT = 5.0  # for the request frame behind the REQUEST
GRACE = 1.0  # an upload may still arrive this long after its granted time (queues drain)

# The server's own data: one random block sent again and again (TLS encrypts it anyway).
_BLOCK = os.urandom(FRAME_MAX)


@dataclass(eq=False)
class Ticket:
    """A running test: whose, and its entry in the device's usage log."""

    device: str
    entry: list  # [when, bytes]: the bytes granted while it runs, then the bytes it moved
    finished: bool = False


class SpeedTests:
    """Who may run a speed test now, and how much (no I/O)."""

    def __init__(
        self,
        *,
        max_bytes: int = MAX_BYTES,
        max_seconds: float = MAX_SECONDS,
        per_device: int = PER_DEVICE,
        total: int = TOTAL,
        allowance: int = ALLOWANCE,
        window: float = WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        self.per_device = per_device
        self.total = total
        self.allowance = allowance
        self.window = window
        self._clock = clock
        self._running: dict[str, int] = {}
        self._used: dict[str, deque[list]] = {}  # per device: [when, bytes], oldest first
        self.refused = 0
        self.granted = 0

    @property
    def running(self) -> int:
        return sum(self._running.values())

    def used(self, device: str) -> int:
        """Bytes of the device's tests within the window, those running at what they were granted."""
        return sum(entry[1] for entry in self._log(device))

    def _log(self, device: str) -> deque[list]:
        log_ = self._used.setdefault(device, deque())
        horizon = self._clock() - self.window
        while log_ and log_[0][0] <= horizon:
            log_.popleft()
        return log_

    def grant(self, device: str, ask: Ask) -> tuple[Grant, Ticket | None]:
        """What ``device`` may do of what it asks: a grant and its ticket, or a refusal."""
        if ask.bytes <= 0 or ask.ms <= 0:
            self.refused += 1
            return Grant(Status.BAD_REQUEST), None
        if self._running.get(device, 0) >= self.per_device or self.running >= self.total:
            self.refused += 1
            return Grant(Status.BUSY), None
        entries = self._log(device)
        left = self.allowance - sum(entry[1] for entry in entries)
        if left < MIN_GRANT:
            # When enough of the oldest entries leave the window to grant MIN_GRANT again.
            now, need, freed = self._clock(), MIN_GRANT - left, 0
            retry = self.window
            for when, size in entries:
                freed += size
                if freed >= need:
                    retry = when + self.window - now
                    break
            self.refused += 1
            return Grant(Status.ALLOWANCE, retry_after=max(1, int(retry + 0.999))), None
        size = min(ask.bytes, self.max_bytes, left)
        ms = min(ask.ms, int(self.max_seconds * 1000))
        entry = [self._clock(), size]
        entries.append(entry)
        self._running[device] = self._running.get(device, 0) + 1
        self.granted += 1
        return Grant(Status.GRANTED, size, ms), Ticket(device, entry)

    def finish(self, ticket: Ticket, moved: int) -> None:
        """The test ended having moved ``moved`` bytes: that is what counts (idempotent)."""
        if ticket.finished:
            return
        ticket.finished = True
        ticket.entry[1] = max(0, moved)
        left = self._running.get(ticket.device, 0) - 1
        if left > 0:
            self._running[ticket.device] = left
        else:
            self._running.pop(ticket.device, None)


class _Frames:
    """The client's frames on a tunnel: one at a time (``next``), or, for an upload, whatever
    has arrived, dropped and counted (``arrived``)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.decoder = FrameDecoder()
        self.ready: deque[bytes] = deque()

    async def _read(self) -> bytes:
        data = await self.reader.read(READ_SIZE)
        if not data:
            raise ConnectionResetError("the tunnel closed without ending the stream")
        return data

    async def next(self) -> bytes | None:
        """The next frame; None once the client ended its stream."""
        while not self.ready:
            if self.decoder.eof:
                return None
            self.ready.extend(self.decoder.feed(await self._read()))
        return self.ready.popleft()

    async def arrived(self) -> int | None:
        """The bytes that arrived since the last call (counted as read, not per frame: a 64 KiB
        frame takes 100 ms at 5 Mbit/s, too coarse a step for a rate); None once the client
        ended its stream."""
        if self.ready:
            size = sum(map(len, self.ready))
            self.ready.clear()
            return size
        if self.decoder.eof:
            return None
        data = await self._read()
        self.decoder.feed(data)  # for the end frame; the payload itself is dropped
        return len(data)


def _frame(writer: asyncio.StreamWriter, payload: bytes) -> None:
    writer.writelines((frame_header(len(payload)), payload))


async def serve_speedtest(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    session: TunnelSession,
    device: str,
    tests: SpeedTests,
    label: str,
    count: Callable[[int, int], None],
) -> None:
    """One speed test on an authenticated tunnel whose REQUEST was SPEEDTEST."""
    writer.write(session.send_reply(Reply.SUCCEEDED))
    frames = _Frames(reader)
    try:
        async with asyncio.timeout(ASK_TIMEOUT):
            first = await frames.next()
        ask = parse_ask(first or b"")
    except (TimeoutError, ProtocolError) as exc:
        log.info("%s: bad speed-test request: %s", label, exc or "none in time")
        _frame(writer, encode_grant(Grant(Status.BAD_REQUEST)))
        writer.write(EOF_FRAME)
        await writer.drain()
        await close_writer(writer)
        return
    grant, ticket = tests.grant(device, ask)
    _frame(writer, encode_grant(grant))
    if ticket is None:
        log.info(
            "%s: refused a speed test (%s): %s",
            label,
            ask.direction.name.lower(),
            grant.status.describe(grant.retry_after),
        )
        writer.write(EOF_FRAME)
        await writer.drain()
        await close_writer(writer)
        return
    started = time.monotonic()
    moved = _Moved()
    try:
        if ask.direction is Direction.DOWN:
            await _send(writer, grant, moved)
        else:
            await _sink(frames, writer, grant, moved)
    except (ConnectionError, OSError):
        pass  # the client hung up: how braidd ends a test once it has its figure
    finally:
        # Counted and let go as soon as the transfer ends; the close may take longer.
        tests.finish(ticket, moved.bytes)
        if ask.direction is Direction.DOWN:
            count(0, moved.bytes)
        else:
            count(moved.bytes, 0)
        log.info(
            "%s: speed test %s: %d bytes in %.1f s (granted %d bytes, %d ms)",
            label,
            ask.direction.name.lower(),
            moved.bytes,
            time.monotonic() - started,
            grant.bytes,
            grant.ms,
        )
    await close_writer(writer)  # what is queued still goes out, unless the client hung up


@dataclass
class _Moved:
    bytes: int = 0


async def _send(writer: asyncio.StreamWriter, grant: Grant, moved: _Moved) -> None:
    """Send the server's data until the granted bytes or time, then the end frame."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(grant.ms / 1000):
            while moved.bytes < grant.bytes:
                size = min(len(_BLOCK), grant.bytes - moved.bytes)
                _frame(writer, _BLOCK[:size] if size < len(_BLOCK) else _BLOCK)
                moved.bytes += size
                await writer.drain()
    writer.write(EOF_FRAME)


async def _sink(frames: _Frames, writer: asyncio.StreamWriter, grant: Grant, moved: _Moved) -> None:
    """Receive the client's data, reporting as it comes, until the granted bytes or time (and a
    little grace for what was already on its way), then the last report and the end frame."""
    loop = asyncio.get_running_loop()
    first: float | None = None
    last_report = 0.0
    limit = loop.time() + grant.ms / 1000 + GRACE

    def report() -> None:
        ms = 0 if first is None else int((loop.time() - first) * 1000)
        _frame(writer, encode_report(Report(moved.bytes, ms)))

    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(limit):
            while moved.bytes < grant.bytes:
                size = await frames.arrived()
                if size is None:
                    break
                moved.bytes += size
                now = loop.time()
                if first is None:
                    first = now
                if now - last_report >= REPORT_INTERVAL:
                    last_report = now
                    report()
                    await writer.drain()
    report()
    writer.write(EOF_FRAME)
    await writer.drain()
    # What is still on its way is read and dropped for a moment, so that the client reads the
    # last report before the connection goes (it hangs up on the end frame).
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(GRACE):
            while await frames.reader.read(READ_SIZE):
                pass


__all__ = [
    "ALLOWANCE",
    "MAX_BYTES",
    "MAX_SECONDS",
    "PER_DEVICE",
    "TOTAL",
    "WINDOW",
    "SpeedTests",
    "Ticket",
    "serve_speedtest",
]
