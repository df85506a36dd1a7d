"""``braid doctor --speed``: each link's download and upload to the server, then all of them
bonded, against the server's own speed-test endpoint (Command.SPEEDTEST).

Per link, a tunnel pinned to it: its first subflow leaves from the link's address (braidd's
rule for that address sends it by the link's table) with braidd's own mark, and nothing adds a
subflow to it — with braidd's path manager (userspace), a tunnel to the server gets subflows
only when braidd asks; with the kernel's, the test uses plain TCP instead, which the kernel
never spreads. Then one tunnel opened through the best link, with a subflow through every
other tested link added at once (as :mod:`braid.daemon.doctor`'s join test does), for the
bonded figure. Each tunnel carries one direction: a download (the server sends its own data,
the laptop times what arrives) or an upload (the laptop sends, the server times what arrives
and reports).

Bounds: every transfer lasts :func:`seconds_each` seconds (at most 3, less with many links, so
that all of them fit in :data:`TIME_LIMIT`); every test asks for at most :data:`MAX_BYTES`, and
the server caps both again. A test that would not fit the time left is skipped and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from braid.aio import spawn
from braid.protocol.address import Address
from braid.protocol.control import ControlError, ErrorCode
from braid.protocol.session import DataReceived, SessionError, StreamEnded
from braid.protocol.speedtest import (
    Ask,
    Direction,
    Status,
    encode_ask,
    parse_grant,
    parse_report,
    steady_rate,
)
from braid.protocol.tunnel import FRAME_MAX, Command, ProtocolError, Reply
from braid.transport import READ_SIZE
from braid.tunnel_client import Tunnel, TunnelError, open_tunnel

#: The whole run ends within this many seconds (connecting, joining and measuring).
TIME_LIMIT = 30.0
#: Of which the transfers may take this much; the rest is for opening tunnels and joins.
TRANSFER_TIME = 24.0
DEFAULT_SECONDS = 3.0
MIN_SECONDS = 0.5
MAX_SECONDS = 5.0
#: What one test asks the server for at most (one direction); the server caps it too.
MAX_BYTES = 64 * 1024 * 1024
OPEN_TIMEOUT = 3.0
#: How long the bonded test waits for its subflows to join.
JOIN_WAIT = 1.5
#: The reply and the grant come within this (seconds).
ANSWER_TIMEOUT = 5.0
#: Progress is reported this often during a transfer (seconds).
PROGRESS_INTERVAL = 0.5
#: Unsent bytes the kernel keeps for an upload: little, so that stopping is prompt.
NOTSENT_LOWAT = 128 * 1024
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)

_ZEROS = bytes(FRAME_MAX)

Progress = Callable[[dict], None]


class SpeedTestRefused(Exception):
    """The server cannot run this test now, or ever (too old); the message says why."""


@dataclass
class Measured:
    bytes: int = 0  # received by the receiver
    seconds: float = 0.0
    bps: float | None = None  # the steady rate, bits per second


@dataclass
class LinkResult:
    name: str
    kind: str = "other"
    down_mbps: float | None = None
    up_mbps: float | None = None
    down_bytes: int = 0
    up_bytes: int = 0
    error: str | None = None  # why a direction has no figure
    skipped: str | None = None  # why the link was not tested at all
    links: list[str] = field(default_factory=list)  # the bonded test's: links it spans
    #: The probes' round trip through the link: before its tests, and at the end of each
    #: transfer (the queue a full link builds, at its ISP or here).
    rtt_idle_ms: float | None = None
    rtt_down_ms: float | None = None
    rtt_up_ms: float | None = None

    def to_json(self) -> dict:
        out = {
            "name": self.name,
            "kind": self.kind,
            "down_mbps": self.down_mbps,
            "up_mbps": self.up_mbps,
            "down_bytes": self.down_bytes,
            "up_bytes": self.up_bytes,
            "error": self.error,
            "skipped": self.skipped,
            "rtt_idle_ms": self.rtt_idle_ms,
            "rtt_down_ms": self.rtt_down_ms,
            "rtt_up_ms": self.rtt_up_ms,
        }
        if self.name == "bonded":
            out["links"] = self.links
        return out


def seconds_each(tests: int, asked: float | None = None) -> float:
    """How long each transfer lasts with ``tests`` tests (two transfers each) (pure)."""
    fit = TRANSFER_TIME / (2 * max(tests, 1))
    return round(max(MIN_SECONDS, min(asked or DEFAULT_SECONDS, MAX_SECONDS, fit)), 2)


def _mbps(bps: float | None) -> float | None:
    return None if bps is None else round(bps / 1e6, 2)


def _recent_bps(samples: list[tuple[float, int]], span: float = 1.0) -> float | None:
    """The rate over the last ``span`` seconds of samples, for the progress display."""
    if len(samples) < 2:
        return None
    end_t, end_b = samples[-1]
    start = next((s for s in samples if s[0] >= end_t - span), samples[0])
    if start is samples[-1]:
        start = samples[-2]
    elapsed = end_t - start[0]
    return (end_b - start[1]) * 8 / elapsed if elapsed > 0 else None


async def _read(tunnel: Tunnel) -> tuple[int, list]:
    """What arrived next: its size, counted as read (a 64 KiB frame is too coarse a step at a
    few Mbit/s), and the session's events for it. Raises TunnelError."""
    try:
        data = await tunnel.reader.read(READ_SIZE)
        if not data:
            tunnel.session.receive_eof()  # raises: the server did not end its stream
        return len(data), tunnel.session.receive(data)
    except (OSError, SessionError) as exc:  # ssl.SSLError is an OSError
        raise TunnelError(f"the tunnel to {tunnel.server} broke ({exc})") from None


async def _answer(tunnel: Tunnel, direction: Direction, seconds: float) -> tuple[float, int, list]:
    """Send the request and read the grant: the seconds the transfer may last, and the bytes
    and events that came behind the grant in the same reads."""
    address = Address("0.0.0.0", 0)
    tunnel.send_request(address, Command.SPEEDTEST)
    ask = Ask(direction, MAX_BYTES, int(seconds * 1000))
    tunnel.writer.write(tunnel.session.send_data(encode_ask(ask)))
    reply = await tunnel.read_reply(address, timeout=ANSWER_TIMEOUT)
    if reply.code is Reply.COMMAND_NOT_SUPPORTED:
        raise SpeedTestRefused(
            f"the server {tunnel.server} is too old for a speed test (it does not know the "
            "request): upgrade braid-server there"
        )
    if reply.code is not Reply.SUCCEEDED:
        raise TunnelError(f"the server refused the speed test: {reply.code.describe()}")
    events: list = []
    read = 0
    try:
        async with asyncio.timeout(ANSWER_TIMEOUT):
            while not any(isinstance(event, DataReceived) for event in events):
                if any(isinstance(event, StreamEnded) for event in events):
                    raise ProtocolError("the server ended the speed test without a grant")
                size, more = await _read(tunnel)
                read += size
                events += more
        first = next(i for i, event in enumerate(events) if isinstance(event, DataReceived))
        grant = parse_grant(events[first].data)
    except TimeoutError:
        raise TunnelError("the server did not answer the speed-test request in time") from None
    except ProtocolError as exc:
        raise TunnelError(str(exc)) from None
    if grant.status is not Status.GRANTED:
        raise SpeedTestRefused(grant.status.describe(grant.retry_after))
    behind = read - 2 - len(events[first].data)  # the REPLY was read exactly; then the grant
    return min(seconds, grant.ms / 1000), behind, events[first + 1 :]


async def measure(
    tunnel: Tunnel,
    direction: Direction,
    seconds: float,
    progress: Callable[[float | None], None] = lambda bps: None,
) -> Measured:
    """One transfer on ``tunnel`` (authenticated, unused); the tunnel is reset afterwards.

    Raises SpeedTestRefused (the server will not) or TunnelError (the tunnel broke).
    """
    try:
        limit, behind, early = await _answer(tunnel, direction, seconds)
        if direction is Direction.DOWN:
            return await _download(tunnel, limit, progress, behind, early)
        return await _upload(tunnel, limit, progress, early)
    finally:
        await tunnel.close(abort=True)  # queued data is worth nothing now


async def _download(tunnel: Tunnel, limit: float, progress, received: int, early: list) -> Measured:
    """Count what arrives until ``limit`` seconds after the first bytes, or the end frame."""
    loop = asyncio.get_running_loop()
    samples: list[tuple[float, int]] = []
    ended = any(isinstance(event, StreamEnded) for event in early)
    if received:
        samples.append((loop.time(), received))
    deadline: float | None = None
    shown = loop.time()
    with contextlib.suppress(TimeoutError):
        # The first bytes start the clock; the server stops by itself at its granted time.
        async with asyncio.timeout(limit + ANSWER_TIMEOUT) as timer:
            while not ended:
                try:
                    size, events = await _read(tunnel)
                except TunnelError:
                    if samples:
                        break  # cut short: what came so far still makes a figure
                    raise
                ended = any(isinstance(event, StreamEnded) for event in events)
                now = loop.time()
                received += size
                samples.append((now, received))
                if deadline is None:
                    deadline = samples[0][0] + limit
                    timer.reschedule(deadline)
                if now - shown >= PROGRESS_INTERVAL:
                    shown = now
                    progress(_recent_bps(samples))
    return _result(samples)


async def _upload(tunnel: Tunnel, limit: float, progress, early: list) -> Measured:
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError):
        tunnel.sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
    samples: list[tuple[float, int]] = []  # the server's reports: its clock, its count

    async def send() -> None:
        with contextlib.suppress(OSError):  # the server ended the test: its reports say so
            while True:
                tunnel.writer.write(tunnel.session.send_data(_ZEROS))
                await tunnel.writer.drain()

    def take(events: list) -> bool:
        """Keep the reports among ``events``; whether the server ended the test."""
        for event in events:
            if isinstance(event, StreamEnded):
                return True
            try:
                report = parse_report(event.data)
            except ProtocolError as exc:
                raise TunnelError(str(exc)) from None
            samples.append((report.ms / 1000, report.bytes))
        return False

    async def reports() -> None:
        shown = loop.time()
        if take(early):
            return
        while not take((await _read(tunnel))[1]):
            if loop.time() - shown >= PROGRESS_INTERVAL:
                shown = loop.time()
                progress(_recent_bps(samples))

    sender = spawn(send(), name="speed-test-upload")
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                await reports()
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
    return _result(samples)


def _result(samples: list[tuple[float, int]]) -> Measured:
    rate = steady_rate(samples)
    return Measured(
        bytes=samples[-1][1] if samples else 0,
        seconds=round(samples[-1][0] - samples[0][0], 3) if len(samples) > 1 else 0.0,
        bps=None if rate is None else rate * 8,
    )


# -- the run over every link ---------------------------------------------------------------


async def _established(r, sock: socket.socket, family: int) -> set[str]:
    from braid.daemon.doctor import established_subflows

    return await asyncio.to_thread(established_subflows, sock, family)


class Run:
    """One ``speed-test`` request: the links, the order, the time left, the progress."""

    def __init__(self, r, mark: int | None, asked: float | None, progress: Progress) -> None:
        from braid.daemon.routing import paths as pm

        self.r = r
        self.mark = mark
        self.progress = progress
        self.started = time.monotonic()
        self.deadline = self.started + TIME_LIMIT
        pairing = r.pairing
        if pairing is None:
            raise ControlError(
                ErrorCode.FAILED, "Braid is not paired with a server: nothing to test against"
            )
        if r.pool is None or not r.pool.connected or not r.server_addresses:
            raise ControlError(
                ErrorCode.FAILED,
                f"Braid is not connected to {pairing.server} now: the speed test needs the "
                "server (run: braid up; braid status says why it is not connected)",
            )
        self.pairing = pairing
        self.address = pm.plain_address(r.server_addresses[0])
        self.family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        self.server = (self.address, pairing.port)
        self.pinned_mptcp = bool(r.spreading.active)
        tested = {p.name: p for p in r.path_links() if p.usable and p.address(self.family)}
        self.results: list[LinkResult] = []
        self.paths = []
        for link in r.ordered():
            result = LinkResult(link.name, link.kind)
            path = tested.get(link.name)
            if path is None:
                result.skipped = _why_not(link, self.family)
            else:
                self.paths.append(path)
            self.results.append(result)
        self.bonded = LinkResult("bonded", "bonded", links=[p.name for p in self.paths])
        if len(self.paths) < 2:
            self.bonded.skipped = "fewer than two links to bond"
        tests = len(self.paths) + (0 if self.bonded.skipped else 1)
        self.seconds = seconds_each(tests, asked)
        self.steps = 2 * tests
        self.step = 0
        self.moved = 0

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def _rtt(self, name: str) -> float | None:
        """The probes' smoothed round trip through ``name`` now (None: not probed)."""
        prober = self.r.prober
        try:
            rtt = prober.health(name).rtt_ms if prober is not None else None
        except KeyError:
            return None
        return None if rtt is None else round(rtt, 1)

    def _report(self, name: str, direction: Direction, bps: float | None) -> None:
        self.progress(
            {
                "step": self.step,
                "steps": self.steps,
                "link": name,
                "direction": direction.name.lower(),
                "mbps": _mbps(bps),
                "elapsed": round(time.monotonic() - self.started, 1),
                "time_limit": TIME_LIMIT,
            }
        )

    async def _open(self, path, timeout: float, mptcp: bool) -> Tunnel:
        return await open_tunnel(
            self.pairing,
            bind=(path.address(self.family), 0),
            family_hint=self.family,
            timeout=timeout,
            mptcp=mptcp,
            addresses=[self.address],
            mark=self.mark,
        )

    async def _open_bonded(self, timeout: float) -> tuple[Tunnel, list[str]]:
        """A tunnel through the best link with a subflow through every other; the links whose
        subflow is up."""
        from braid.daemon.routing import paths as pm

        first, others = self.paths[0], self.paths[1:]
        tunnel = await self._open(first, timeout, True)
        try:
            wanted = {p.address(self.family): p.name for p in others}
            if self.r.spreading.active:
                token = pm.token(tunnel.sock)
                if token is None:
                    return tunnel, [first.name]  # fell back to TCP: one path only
                for path in others:
                    with contextlib.suppress(Exception):  # the link then stays out; joins say why
                        await self.r.platform.in_netlink(
                            self.r.platform.paths.create,
                            token,
                            path.address(self.family),
                            path.local_id(self.family),
                            path.ifindex,
                            self.server,
                            False,
                        )
            # (With the kernel's path manager, its endpoints add the subflows by themselves.)
            joined: set[str] = set()
            wait_until = time.monotonic() + JOIN_WAIT
            while time.monotonic() < wait_until:
                joined = await _established(self.r, tunnel.sock, self.family)
                if all(address in joined for address in wanted):
                    break
                await asyncio.sleep(0.05)
            return tunnel, [first.name] + [wanted[a] for a in wanted if a in joined]
        except BaseException:
            await tunnel.close(abort=True)
            raise

    async def _one(self, result: LinkResult, direction: Direction, bonded: bool) -> None:
        self.step += 1
        name = "all links bonded" if bonded else result.name
        needed = self.seconds + (JOIN_WAIT if bonded else 0.0) + 0.5
        if self.left() < needed:
            result.error = _join(
                result.error, f"{direction.name.lower()}: not measured, out of time"
            )
            return
        self._report(result.name, direction, None)
        if not bonded and direction is Direction.DOWN:
            result.rtt_idle_ms = self._rtt(result.name)
        timeout = min(OPEN_TIMEOUT, self.left() - self.seconds)
        try:
            if bonded:
                tunnel, spanning = await self._open_bonded(timeout)
                result.links = spanning
            else:
                path = next(p for p in self.paths if p.name == result.name)
                tunnel = await self._open(path, timeout, self.pinned_mptcp)
            measured = await measure(
                tunnel,
                direction,
                self.seconds,
                lambda bps: self._report(result.name, direction, bps),
            )
        except SpeedTestRefused as exc:
            raise ControlError(ErrorCode.FAILED, str(exc)) from None
        except TunnelError as exc:
            result.error = _join(result.error, f"{direction.name.lower()}: {exc}")
            return
        self.moved += measured.bytes
        mbps = _mbps(measured.bps)
        loaded = None if bonded else self._rtt(result.name)
        if direction is Direction.DOWN:
            result.down_mbps, result.down_bytes, result.rtt_down_ms = mbps, measured.bytes, loaded
        else:
            result.up_mbps, result.up_bytes, result.rtt_up_ms = mbps, measured.bytes, loaded
        if mbps is None:
            result.error = _join(
                result.error, f"{direction.name.lower()}: too little arrived to measure ({name})"
            )
        self._report(result.name, direction, measured.bps)

    async def run(self) -> dict:
        if not self.paths:
            raise ControlError(
                ErrorCode.FAILED,
                "no link can be tested: none is up, answering the server and allowed to "
                "carry traffic (braid links shows why)",
            )
        by_name = {result.name: result for result in self.results}
        for path in self.paths:
            for direction in (Direction.DOWN, Direction.UP):
                await self._one(by_name[path.name], direction, bonded=False)
        if not self.bonded.skipped:
            for direction in (Direction.DOWN, Direction.UP):
                await self._one(self.bonded, direction, bonded=True)
        return {
            "server": self.pairing.server,
            "seconds": self.seconds,
            "time_limit": TIME_LIMIT,
            "links": [result.to_json() for result in self.results],
            "bonded": self.bonded.to_json(),
            "elapsed_s": round(time.monotonic() - self.started, 1),
            "bytes": self.moved,
        }


def _join(before: str | None, more: str) -> str:
    return more if not before else f"{before}; {more}"


def _why_not(link, family: int) -> str:
    from braid.daemon import policy

    priority = str(link.effective or link.priority)
    if priority == "never":
        return "priority never: Braid does not use it"
    if str(link.state) != "up":
        return f"not usable: {link.state}"
    if policy.source_address(link, family) is None:
        return "no address of the server's family (IPv4 or IPv6) on it"
    if link.alive is False:
        return "it does not answer the health probes"
    return "Braid's routing for it is not in place"


async def run_speed_test(r, mark: int | None, seconds: float | None, progress: Progress) -> dict:
    """The whole ``speed-test`` answer (raises ControlError when it cannot run at all)."""
    run = Run(r, mark, seconds, progress)
    try:
        async with asyncio.timeout(TIME_LIMIT + 5):  # a bug must not make it unbounded
            return await run.run()
    except TimeoutError:
        raise ControlError(
            ErrorCode.FAILED, f"the speed test did not end within {TIME_LIMIT + 5:.0f} s"
        ) from None


__all__ = ["Measured", "SpeedTestRefused", "measure", "run_speed_test", "seconds_each"]
