"""braid-server's listener: authenticate tunnels, connect to destinations, relay.

One connection carries one flow: TLS handshake, HELLO with the token, AUTH_OK,
then (after up to ``timeouts.idle`` in the client's warm pool) one REQUEST,
its REPLY, and the framed relay until both directions have ended. The flow
is a TCP stream (CONNECT), datagrams to one destination (UDP, see udp.py) or
DNS messages answered by the server's resolver (DNS, see dns.py), or a bounded
speed test against the server itself (SPEEDTEST, see speedtest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import hashlib
import json
import logging
import os
import signal
import socket
import ssl
import time
from collections import Counter
from dataclasses import dataclass, fields

from braid import logs, memory
from braid.aio import cancel_all, spawn
from braid.protocol.address import Address
from braid.protocol.session import (
    HelloReceived,
    Phase,
    RequestReceived,
    Role,
    SessionError,
    TunnelSession,
)
from braid.protocol.tunnel import Command, ProtocolError, Reply, Request, encode_reply
from braid.server.admission import (
    CLOSED_OR_GARBAGE,
    PER_SOURCE,
    SILENT,
    TLS,
    TOTAL,
    Admission,
    Pending,
    source_key,
)
from braid.server.datagram import DatagramSessions
from braid.server.dns import Resolver, serve_dns
from braid.server.policy import judge, normalise
from braid.server.probe import start_probe_responder
from braid.server.speedtest import SpeedTests, serve_speedtest
from braid.server.state import (
    Device,
    DeviceSeen,
    ServerConfig,
    StateDir,
    StateError,
    format_hostport,
    read_seen,
    write_seen,
)
from braid.server.system import OwnAddresses, read_mptcp_limits
from braid.server.udp import DatagramCounters, DatagramPipe, relay_udp
from braid.stall import RMEM_MAX_ADVICE, TUNNEL_RCVBUF, fix_receive_buffer, rmem_max
from braid.transport import (
    IDLE_RESTART,
    MptcpUnavailable,
    RelayCounters,
    close_writer,
    is_mptcp,
    mptcp_socket,
    read_event,
    relay,
    restart_congestion_control,
)

log = logging.getLogger(__name__)

STATS_INTERVAL = 60.0
DEVICES_INTERVAL = 0.5  # how often server.json is checked for removed devices
SEEN_INTERVAL = 5.0  # how often devices-seen.json is written when something changed
SEEN_HEARTBEAT = 60.0  # and when nothing did: `device list` tells a running server by it
WARNING_INTERVAL = 10.0
ACCEPT_BATCH = 64  # connections accepted per wake-up before others get a turn
UDP_IDLE = 120.0  # default of timeouts.udp_idle: UDP and DNS sessions without a datagram


# The activity record of the device a connection's task serves, for its byte counts.
_current_device: contextvars.ContextVar[DeviceSeen | None] = contextvars.ContextVar(
    "braid_server_device", default=None
)


class ListenError(Exception):
    """The listening socket could not be opened; the message says why."""


def open_listener(host: str, port: int, backlog: int = 1024) -> tuple[socket.socket, bool]:
    """A non-blocking listening socket on host:port and whether it speaks MPTCP.

    An MPTCP listener accepts plain TCP clients too: the kernel falls back by
    itself when the client's SYN has no MP_CAPABLE option.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    where = format_hostport(host, port)
    try:
        sock, mptcp = mptcp_socket(family), True
    except MptcpUnavailable as exc:
        log.warning("%s: listening with plain TCP, so clients cannot bond links", exc.strerror)
        sock, mptcp = socket.socket(family, socket.SOCK_STREAM), False
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 clients too
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        reason = {
            errno.EADDRINUSE: "the port is already in use (is another braid-server running?)",
            errno.EADDRNOTAVAIL: "this machine has no such address",
            errno.EACCES: "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
        }.get(exc.errno or 0, exc.strerror or str(exc))
        raise ListenError(f"cannot listen on {where}: {reason}") from None
    return sock, mptcp


@dataclass
class Stats:
    connections: int = 0  # accepted, authenticated or not
    auth_failures: int = 0  # a wrong token, a bad HELLO, a failed TLS handshake
    cut_short: int = 0  # closed or timed out before a HELLO, or pushed out by newer ones
    requests: int = 0
    refused: int = 0  # by the policy
    unreachable: int = 0  # the destination could not be reached
    bytes_up: int = 0  # client -> destination, datagrams included
    bytes_down: int = 0
    datagrams_up: int = 0  # UDP datagrams and DNS messages
    datagrams_down: int = 0
    active: int = 0
    clients: int = 0  # distinct addresses with an authenticated tunnel open

    def snapshot(self) -> tuple[int, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def summary(self) -> str:
        return (
            f"{self.active} open from {self.clients} client addresses, "
            f"{self.connections} accepted, "
            f"{self.auth_failures} failed authentication, "
            f"{self.cut_short} handshakes cut short, "
            f"{self.requests} requests "
            f"({self.refused} refused, {self.unreachable} unreachable), "
            f"{self.bytes_up} bytes up, {self.bytes_down} bytes down, "
            f"{self.datagrams_up} datagrams up, {self.datagrams_down} datagrams down"
        )


def udp_idle_timeout(config: ServerConfig, state: StateDir | None = None) -> float:
    """``timeouts.udp_idle`` in seconds (120 unless server.json says otherwise; a bad value is
    a StateError from :meth:`StateDir.load` already)."""
    return config.timeouts.udp_idle


class WarningLimiter:
    """At most one warning per source address per ``interval``, with a count of the rest.

    Scanners and a laptop with a stale token retry all the time; the log must
    show them without being flooded.
    """

    def __init__(
        self,
        interval: float = WARNING_INTERVAL,
        max_sources: int = 4096,
        max_lines: int = 20,
    ) -> None:
        self.interval = interval
        self.max_sources = max_sources
        self.max_lines = max_lines  # per interval in all: many sources must not flood it either
        self._last: dict[str, tuple[float, int]] = {}  # source -> (logged at, suppressed)
        self._window = (-float("inf"), 0, 0)  # (started, lines logged, lines suppressed)

    def warn(self, source: str, message: str) -> bool:
        """Log ``message`` unless ``source`` was reported recently; True if logged."""
        now = time.monotonic()
        source = source_key(source)
        logged_at, suppressed = self._last.get(source, (-float("inf"), 0))
        if now - logged_at < self.interval:
            self._last[source] = (logged_at, suppressed + 1)
            return False
        started, lines, dropped = self._window
        if now - started >= self.interval:
            if dropped:
                log.warning(
                    "%d more warnings from other addresses in the last %.0f s were not logged",
                    dropped,
                    now - started,
                )
            started, lines, dropped = now, 0, 0
        if lines >= self.max_lines:
            self._window = (started, lines, dropped + 1)
            return False
        self._window = (started, lines + 1, dropped)
        if suppressed:
            message += f" (and {suppressed} more from {source} in the last {now - logged_at:.0f} s)"
        log.warning("%s", message)
        if len(self._last) >= self.max_sources:
            self._forget(now)
        self._last[source] = (now, 0)
        return True

    def _forget(self, now: float) -> None:
        for source, (logged_at, _) in list(self._last.items()):
            if now - logged_at >= self.interval:
                del self._last[source]
        if len(self._last) >= self.max_sources:
            self._last.clear()


class Devices:
    """The devices of server.json and their token hashes, re-read when the file changes.

    So that ``braid-server device add`` and ``device remove`` (and ``init
    --new-token``) apply at once, without restarting the server.
    """

    def __init__(self, config: ServerConfig, state: StateDir | None) -> None:
        self._state = state
        self._mtime = self._stat()
        self._by_digest: dict[bytes, Device] = {}
        self._set(config.devices)

    def _set(self, devices: list[Device]) -> None:
        self.devices = list(devices)
        self._by_digest = {bytes.fromhex(d.token_sha256): d for d in devices}

    def _stat(self) -> int | None:
        if self._state is None:
            return None
        try:
            return os.stat(self._state.config_path).st_mtime_ns
        except OSError:
            return None

    def refresh(self) -> bool:
        """Re-read server.json if it changed; True if the devices did."""
        mtime = self._stat()
        if mtime is None or mtime == self._mtime or self._state is None:
            return False
        self._mtime = mtime
        try:
            devices = self._state.load().devices
        except StateError as exc:
            log.warning("keeping the previous devices: %s", exc)
            return False
        before = {(d.name, d.token_sha256) for d in self.devices}
        after = {(d.name, d.token_sha256) for d in devices}
        if before == after:
            return False
        for name in sorted({n for n, _ in after - before}):
            log.info("device %s may connect (new, or with a new token)", name)
        for name in sorted({n for n, _ in before - after}):
            log.info("device %s: its token no longer works", name)
        self._set(devices)
        return True

    def match(self, token: bytes) -> Device | None:
        """The device whose token this is, if any.

        A dictionary lookup on the token's SHA-256: timing can tell at most
        something about the hash of a wrong guess, which helps nobody guess.
        """
        self.refresh()
        return self._by_digest.get(hashlib.sha256(token).digest())

    def hashes(self) -> list[str]:
        """Every device's token hash (the keys of their health probes)."""
        self.refresh()
        return [d.token_sha256 for d in self.devices]

    def current(self, device: Device) -> bool:
        """Whether ``device`` may still connect: not removed, its token not replaced."""
        return self._by_digest.get(bytes.fromhex(device.token_sha256)) == device


def admission_for(max_files: int | None) -> Admission:
    """Handshake limits that leave most descriptors to authenticated tunnels (two per flow)."""
    total = TOTAL if max_files is None else max(16, min(TOTAL, max_files // 8))
    return Admission(per_source=min(PER_SOURCE, total), total=total)


class _NotTls(Exception):
    """The first bytes of a connection are not a TLS handshake record."""


class _Unauthenticated:
    """A connection before its HELLO, and how to drop it from outside at once.

    A handshake pushed out by newer connections closes its descriptor there and
    then, not when its task next runs: under a flood that may be many batches later.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.started = False
        self.waiting: asyncio.Future | None = None  # set while waiting for the first bytes

    def drop(self) -> None:
        if not self.started:
            self.sock.close()  # its task will see it dropped before touching the socket
        elif self.waiting is not None:
            asyncio.get_running_loop().remove_reader(self.fd)  # before the fd can be reused
            if not self.waiting.done():
                self.waiting.set_result(None)
            self.waiting = None
            self.sock.close()
        else:  # in TLS: the transport owns the socket; ending it wakes whatever waits on it
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)


def _peek(sock: socket.socket) -> int:
    """What the peer's unread bytes say: a TLS handshake begun, nothing yet, or neither."""
    try:
        head = sock.recv(3, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return SILENT
    except OSError:
        return CLOSED_OR_GARBAGE
    if head[:1] == b"\x16" and head[1:2] in (b"", b"\x03"):  # a record's start, maybe cut short
        return TLS
    return CLOSED_OR_GARBAGE  # closed (nothing to read) or not TLS


def _drop(sock: socket.socket, transport: asyncio.BaseTransport | None) -> None:
    """Close at once, without a TLS goodbye: a refused peer gets nothing."""
    if transport is not None:
        transport.abort()  # type: ignore[attr-defined]
    else:
        sock.close()


_ERRNO_REPLY = {
    errno.ECONNREFUSED: Reply.CONNECTION_REFUSED,
    errno.ENETUNREACH: Reply.NETWORK_UNREACHABLE,
    errno.ENETDOWN: Reply.NETWORK_UNREACHABLE,
    errno.EADDRNOTAVAIL: Reply.NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: Reply.HOST_UNREACHABLE,
    errno.EHOSTDOWN: Reply.HOST_UNREACHABLE,
    errno.ETIMEDOUT: Reply.TIMED_OUT,
}
# When several addresses fail differently, the most telling failure is reported.
_REPLY_RANK = [
    Reply.CONNECTION_REFUSED,
    Reply.TIMED_OUT,
    Reply.HOST_UNREACHABLE,
    Reply.NETWORK_UNREACHABLE,
    Reply.GENERAL_FAILURE,
]


@dataclass
class Authenticated:
    """A tunnel whose HELLO was accepted: its streams, its device, its session (READY)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    device: Device
    session: TunnelSession


async def _reply_to_bad_request(writer: asyncio.StreamWriter, code: Reply) -> None:
    """The REPLY a request the session refused calls for (the session has ended), then close."""
    writer.write(encode_reply(code))
    await writer.drain()
    await close_writer(writer)


@dataclass
class Outcome:
    code: Reply
    detail: str
    sock: socket.socket | None = None


class BraidServer:
    def __init__(
        self,
        config: ServerConfig,
        tls: ssl.SSLContext,
        listener: socket.socket,
        *,
        state: StateDir | None = None,
        own_addresses: OwnAddresses | None = None,
        max_files: int | None = None,
    ) -> None:
        self.config = config
        self.tls = tls
        self.listener = listener
        self.policy = config.policy()
        self.state = state
        self.devices = Devices(config, state)
        self.own = own_addresses or OwnAddresses()
        self.udp_idle = udp_idle_timeout(config, state)
        self.resolver = Resolver()
        self.stats = Stats()
        self.warnings = WarningLimiter()
        self.admission = admission_for(max_files)
        self.datagrams = DatagramSessions(self._open_udp, self.udp_idle)
        self.speed_tests = SpeedTests()
        self._clients: Counter[str] = Counter()  # authenticated tunnels open per address
        self._tunnels: dict[Device, set[asyncio.Task]] = {}  # open, per device
        self.seen: dict[str, DeviceSeen] = read_seen(state)[1] if state is not None else {}
        self._seen_dirty = False
        self._conns: set[asyncio.Task] = set()
        self._rcvbuf_warned = False  # said once: this process may not fix tunnel buffers
        self._stop: asyncio.Event | None = None

    # --- lifecycle -----------------------------------------------------------------

    async def serve(self) -> None:
        """Serve until SIGTERM or SIGINT (or ``stop()``), then close everything."""
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, sig)
        loop.add_signal_handler(signal.SIGUSR1, self._log_stats)
        # Health probes: UDP on the listener's own address and port.
        probes = await start_probe_responder(
            self.config.listen_host,
            self.listener.getsockname()[1],
            self.devices.hashes,
            WarningLimiter().warn,
        )
        self.datagrams.attach(probes)
        accept = spawn(self._accept_loop(), "accept")
        ticker = spawn(self._stats_loop(), "stats")
        trimmer = spawn(memory.trim_periodically(), "malloc-trim")
        watcher = spawn(self._devices_loop(), "devices")
        stopping = spawn(self._stop.wait(), "stop")
        try:
            await asyncio.wait([accept, stopping], return_when=asyncio.FIRST_COMPLETED)
            if accept.done() and not accept.cancelled() and accept.exception():
                raise accept.exception()  # type: ignore[misc]
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
            await cancel_all([accept, ticker, trimmer, watcher, stopping])
            self.listener.close()
            if probes is not None:
                probes.close()
            await cancel_all(list(self._conns))
            self._log_stats()
            self._write_seen()

    def stop(self, sig: int | None = None) -> None:
        if sig is not None:
            log.info("%s: shutting down", signal.Signals(sig).name)
        if self._stop is not None:
            self._stop.set()

    async def _accept_loop(self) -> None:
        """Accept in batches whenever the listener is readable.

        Not ``loop.sock_accept``: cancelled at shutdown while a connection is
        arriving, it logs an InvalidStateError traceback (Python 3.11).
        """
        loop = asyncio.get_running_loop()
        fd = self.listener.fileno()
        ready = asyncio.Event()
        complained = -float("inf")
        loop.add_reader(fd, ready.set)
        try:
            while True:
                await ready.wait()
                ready.clear()
                for _ in range(ACCEPT_BATCH):
                    try:
                        sock, peer = self.listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as exc:
                        if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                            continue
                        if exc.errno not in (
                            errno.EMFILE,
                            errno.ENFILE,
                            errno.ENOBUFS,
                            errno.ENOMEM,
                        ):
                            raise
                        if time.monotonic() - complained > WARNING_INTERVAL:
                            complained = time.monotonic()
                            log.error("cannot accept connections: %s; retrying", exc.strerror)
                        # Level-triggered: wait a little instead of spinning on the error.
                        loop.remove_reader(fd)
                        await asyncio.sleep(0.1)
                        loop.add_reader(fd, ready.set)
                        ready.set()
                        break
                    self._start(sock, peer)
                else:
                    ready.set()  # more may be waiting: let the others run first
                    await asyncio.sleep(0)
        finally:
            loop.remove_reader(fd)

    def _start(self, sock: socket.socket, peer: tuple) -> None:
        sock.setblocking(False)
        # Small messages (AUTH_OK, REPLY, short frames) must not wait for
        # Nagle's algorithm and the peer's delayed ACK: that costs 40 ms.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Admitted here, before its task runs: the limits then bound what is held, not
        # only what has been looked at.
        conn = _Unauthenticated(sock)
        entry, victims = self.admission.admit(
            str(normalise(peer[0])), conn.drop, lambda: _peek(sock)
        )
        self.stats.cut_short += len(victims)
        task = spawn(self._handle(conn, peer, entry), f"conn {peer[0]}:{peer[1]}")
        self._conns.add(task)
        task.add_done_callback(self._conns.discard)

    async def _stats_loop(self) -> None:
        reported = self.stats.snapshot()
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            if self.stats.snapshot() != reported:
                self._log_stats()
                reported = self.stats.snapshot()

    def _log_stats(self) -> None:
        log.info("stats: %s", self.stats.summary())
        for device in self.devices.devices:
            seen = self.seen.get(device.name, DeviceSeen())
            log.info(
                "device %s: %d open, last from %s, %d bytes up, %d bytes down",
                device.name,
                len(self._tunnels.get(device, ())),
                seen.address or "nowhere yet",
                seen.bytes_up,
                seen.bytes_down,
            )

    async def _devices_loop(self) -> None:
        """Cut the tunnels of removed devices at once; keep devices-seen.json current."""
        self._write_seen()
        written = time.monotonic()
        while True:
            await asyncio.sleep(DEVICES_INTERVAL)
            if self.devices.refresh():
                self._cut_removed()
            since = time.monotonic() - written
            if (self._seen_dirty and since >= SEEN_INTERVAL) or since >= SEEN_HEARTBEAT:
                self._write_seen()
                written = time.monotonic()

    def _cut_removed(self) -> None:
        names = {d.name for d in self.devices.devices}
        for device, tasks in list(self._tunnels.items()):
            if self.devices.current(device):
                continue
            log.info(
                "device %s was removed or its token replaced: closing its %d tunnels",
                device.name,
                len(tasks),
            )
            for task in tasks:
                task.cancel()
            del self._tunnels[device]
        for name in list(self.seen):
            if name not in names:
                del self.seen[name]
                self._seen_dirty = True

    def _write_seen(self) -> None:
        if self.state is None:
            return
        for device in self.devices.devices:
            if device.name in self.seen:
                self.seen[device.name].open = len(self._tunnels.get(device, ()))
        try:
            write_seen(self.state, time.time(), self.seen)
            self._seen_dirty = False
        except OSError as exc:
            log.debug("cannot write %s: %s", self.state.seen_path, exc)

    def _count_datagrams(self, counters: DatagramCounters) -> None:
        self.stats.datagrams_up += counters.datagrams_up
        self.stats.datagrams_down += counters.datagrams_down
        self._count(counters.bytes_up, counters.bytes_down)

    def _count(self, up: int, down: int) -> None:
        """Bytes relayed, in the server's counters and the device's."""
        self.stats.bytes_up += up
        self.stats.bytes_down += down
        seen = _current_device.get()
        if seen is not None:
            seen.bytes_up += up
            seen.bytes_down += down
            self._seen_dirty = True

    # --- one connection ----------------------------------------------------------------

    async def _handle(self, conn: _Unauthenticated, peer: tuple, entry: Pending) -> None:
        sock = conn.sock
        source = str(normalise(peer[0]))
        label = format_hostport(source, peer[1])
        self.stats.connections += 1
        self.stats.active += 1
        writer: asyncio.StreamWriter | None = None
        device: Device | None = None
        task = asyncio.current_task()
        try:
            authenticated = await self._authenticate(conn, source, label, entry)
            if authenticated is None:
                return
            writer, device = authenticated.writer, authenticated.device
            label = f"{device.name} from {label}"  # the log names the device
            log.debug("%s: authenticated (mptcp=%s)", label, is_mptcp(sock))
            self._clients[source] += 1
            self.stats.clients = len(self._clients)
            if task is not None:
                self._tunnels.setdefault(device, set()).add(task)
            seen = self.seen.setdefault(device.name, DeviceSeen())
            seen.last_contact, seen.address = time.time(), source
            self._seen_dirty = True
            _current_device.set(seen)
            await self._serve_request(authenticated, label)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            log.debug("%s: connection lost: %r", label, exc)
        except ProtocolError as exc:
            log.info("%s: protocol error: %s", label, exc)
        except OSError as exc:
            log.info("%s: %s", label, exc)
        finally:
            self.stats.active -= 1
            if device is not None:
                self._seen_dirty = True  # one tunnel fewer
            if device is not None and task is not None:
                tasks = self._tunnels.get(device)
                if tasks is not None:
                    tasks.discard(task)
                    if not tasks:
                        del self._tunnels[device]
            if writer is not None:
                self._clients[source] -= 1
                if self._clients[source] <= 0:
                    del self._clients[source]
                self.stats.clients = len(self._clients)
            # Before authentication, _authenticate has already dropped the socket.
            if writer is not None and not writer.is_closing():
                await close_writer(writer, abort=True)

    async def _authenticate(
        self, conn: _Unauthenticated, source: str, label: str, entry: Pending
    ) -> Authenticated | None:
        """Run the admitted handshake, and let go of its slot whatever happens.

        A newer connection may push this one out (see admission.py): its socket
        is shut down, so whatever it waits for ends at once and it is dropped.
        """
        try:
            return await self._handshake(conn, source, label, entry)
        finally:
            self.admission.release(entry)

    async def _first_bytes(self, conn: _Unauthenticated, deadline: float) -> bool:
        """Wait until the peer sends something; False if it closed (or was pushed out) first.

        No TLS state exists until then: a connection that only connects costs a
        descriptor, and is the first to go when the server is full.
        """
        loop = asyncio.get_running_loop()
        ready = conn.waiting = loop.create_future()
        loop.add_reader(conn.fd, lambda: ready.done() or ready.set_result(None))
        try:
            async with asyncio.timeout_at(deadline):
                await ready
        finally:
            if conn.waiting is not None:  # else drop() removed it and closed the socket
                loop.remove_reader(conn.fd)
                conn.waiting = None
        try:
            return bool(conn.sock.recv(1, socket.MSG_PEEK))
        except (BlockingIOError, InterruptedError):
            return True  # readable but nothing there yet: let TLS wait for it
        except OSError:  # closed by drop() included
            return False

    async def _handshake(
        self, conn: _Unauthenticated, source: str, label: str, entry: Pending
    ) -> Authenticated | None:
        """TLS handshake and HELLO within the handshake timeout; None if refused.

        A refused peer is dropped without a byte of the protocol: it learns
        nothing about why, and a scanner cannot tell Braid from any TLS server.
        A peer that was only slow, that closed, or that a newer connection pushed
        out is dropped the same way; none of it counts against its address.
        """
        sock = conn.sock
        conn.started = True
        if entry.dropped:  # pushed out before its task ever ran: already closed
            log.debug("%s: dropped before its handshake: newer connections needed the room", label)
            return None
        loop = asyncio.get_running_loop()
        timeout = self.config.timeouts.handshake
        deadline = loop.time() + timeout
        reader = asyncio.StreamReader(limit=2**17)
        protocol = asyncio.StreamReaderProtocol(reader)
        transport: asyncio.BaseTransport | None = None
        failed = False  # a real failure (bad TLS, bad HELLO, wrong token), not just a hang-up
        spoke = timed_out = False
        session = TunnelSession(Role.SERVER)
        try:
            reason = ""
            try:
                spoke = await self._first_bytes(conn, deadline)
                if spoke and _peek(sock) != TLS:
                    # Every TLS connection opens with a handshake record: anything else is
                    # refused before any TLS state (Python's takes 256 KiB) is made for it.
                    raise _NotTls
                if spoke:
                    entry.spoke = True
                    async with asyncio.timeout_at(deadline):
                        transport, _ = await loop.connect_accepted_socket(
                            lambda: protocol,
                            sock,
                            ssl=self.tls,
                            ssl_handshake_timeout=max(deadline - loop.time(), 0.001),
                        )
                        writer = asyncio.StreamWriter(transport, protocol, reader, loop)  # type: ignore[arg-type]
                        event = await read_event(reader, session)
                        assert isinstance(event, HelloReceived)  # all the session allows here
            except TimeoutError:
                reason = f"no TLS handshake and HELLO within {timeout:g} s"
                timed_out = True
            except _NotTls:
                reason = "not a TLS handshake"
                failed = True
            except ssl.SSLError as exc:
                reason = f"TLS handshake failed ({exc.reason or exc})"
                failed = True
            except SessionError as exc:
                if exc.closed:
                    reason = "closed the connection without sending a HELLO"
                else:
                    reason = f"bad HELLO: {exc}"
                    failed = True
            except OSError as exc:
                reason = f"connection failed: {logs.reason(exc)}"
            else:
                if not spoke:
                    reason = "closed the connection without sending anything"
                elif (device := self.devices.match(event.hello.token)) is not None:
                    self.admission.release(entry)  # authenticated: no longer anyone's to push out
                    writer.write(session.send_auth_ok())
                    await writer.drain()
                    return Authenticated(reader, writer, device, session)
                else:
                    reason = "wrong token"
                    failed = True
        except BaseException:  # cancelled at shutdown, or the peer vanished after HELLO
            _drop(sock, transport)
            raise
        _drop(sock, transport)
        if entry.dropped:
            log.debug("%s: dropped while handshaking: newer connections needed the room", label)
            return None
        if failed:
            self.stats.auth_failures += 1
        else:
            self.stats.cut_short += 1
        if not spoke and not failed and not timed_out:
            log.debug("%s: %s", label, reason)  # connected and closed: a port scan, say
        else:
            self.warnings.warn(source, f"rejected {label}: {reason}")
        return None

    async def _serve_request(self, tunnel: Authenticated, label: str) -> None:
        idle = self.config.timeouts.idle
        reader, writer, session = tunnel.reader, tunnel.writer, tunnel.session
        waiting = time.monotonic()
        try:
            async with asyncio.timeout(idle):
                event = await read_event(reader, session)
                assert isinstance(event, RequestReceived)  # all the session allows here
        except TimeoutError:
            log.debug("%s: no request within %g s, closing the idle tunnel", label, idle)
            await close_writer(writer)
            return
        except SessionError as exc:
            if exc.closed and exc.phase is Phase.READY:
                log.debug("%s: the client closed an unused tunnel", label)
                await close_writer(writer)
            elif exc.closed:
                log.debug("%s: the client closed the tunnel mid-request", label)
                await close_writer(writer, abort=True)
            else:
                log.info("%s: bad request: %s", label, exc)
                await _reply_to_bad_request(writer, exc.reply or Reply.GENERAL_FAILURE)
            return

        request = event.request
        self.stats.requests += 1
        # A device's connection only (never a stranger's: see stall.fix_receive_buffer). Not
        # the speed test's: a pinned single-link transfer gains nothing from it, and its rates
        # are timed as the server reads them.
        fixed = request.command != Command.CONNECT or fix_receive_buffer(
            writer.get_extra_info("socket")
        )
        if not fixed and not self._rcvbuf_warned:
            self._rcvbuf_warned = True
            log.warning(
                "net.core.rmem_max (%d) is below %d: tunnels keep receive autotuning, and bulk "
                "uploads over several links may pause for a third of a second now and then; "
                "raise it: sysctl -w net.core.rmem_max=%d (and in /etc/sysctl.d)",
                rmem_max(),
                TUNNEL_RCVBUF // 2,
                RMEM_MAX_ADVICE,
            )
        if time.monotonic() - waiting >= IDLE_RESTART:
            # The tunnel waited in the client's pool: its congestion state is stale.
            restart_congestion_control(writer.get_extra_info("socket"))
        if request.command == Command.CONNECT:
            await self._serve_connect(request, tunnel, label)
        elif request.command == Command.UDP:
            await self._serve_udp(request, tunnel, label)
        elif request.command == Command.DNS:
            await self._serve_dns(tunnel, label)
        elif request.command == Command.DATAGRAM:
            await self.datagrams.serve(tunnel.reader, tunnel.writer, label)
        elif request.command == Command.SPEEDTEST:
            await serve_speedtest(
                reader,
                writer,
                session,
                tunnel.device.name,
                self.speed_tests,
                label,
                self._count,
            )
        elif request.command == Command.INFO:
            await self._serve_info(tunnel)
        else:
            log.info("%s: unsupported command %s", label, request.command.name)
            await self._reply(tunnel, Reply.COMMAND_NOT_SUPPORTED)

    async def _serve_connect(self, request: Request, tunnel: Authenticated, label: str) -> None:
        reader, writer = tunnel.reader, tunnel.writer
        dest = request.address
        outcome = await self._connect(dest)
        if outcome.sock is None:
            await self._refuse(tunnel, label, dest, outcome)
            return

        target = outcome.sock
        host, port = target.getpeername()[:2]
        log.debug("%s: connected to %s (%s)", label, dest, format_hostport(host, port))
        try:
            plain = await asyncio.open_connection(sock=target, limit=2**17)
        except OSError as exc:
            target.close()
            await self._reply(tunnel, Reply.GENERAL_FAILURE)
            log.info("%s: lost the connection to %s at once: %s", label, dest, exc)
            return
        bound = Address(str(normalise(host)), port)
        writer.write(tunnel.session.send_reply(Reply.SUCCEEDED, bound))
        counters = RelayCounters()
        try:
            await relay(
                plain,
                (reader, writer),
                counters,
                tunnel_is_client_side=False,
                label=f"{label}: {dest}",
            )
        finally:
            self._count(counters.up, counters.down)
            log.debug("%s: %s done, %d bytes up, %d down", label, dest, counters.up, counters.down)

    async def _serve_udp(self, request: Request, tunnel: Authenticated, label: str) -> None:
        reader, writer = tunnel.reader, tunnel.writer
        dest = request.address
        outcome = await self._open_udp(dest)
        if outcome.sock is None:
            await self._refuse(tunnel, label, dest, outcome)
            return
        target = outcome.sock
        counters = DatagramCounters()
        try:
            host, port = target.getpeername()[:2]
            log.debug("%s: UDP to %s (%s)", label, dest, format_hostport(host, port))
            bound = Address(str(normalise(host)), port)
            writer.write(tunnel.session.send_reply(Reply.SUCCEEDED, bound))
            pipe = DatagramPipe(reader, writer, self.udp_idle, counters)
            reason = await relay_udp(pipe, target)
            log.debug("%s: UDP to %s ended (%s)", label, dest, reason)
        finally:
            target.close()
            self._count_datagrams(counters)
            log.debug(
                "%s: UDP to %s done, %d datagrams up, %d down",
                label,
                dest,
                counters.datagrams_up,
                counters.datagrams_down,
            )

    async def _serve_dns(self, tunnel: Authenticated, label: str) -> None:
        counters = DatagramCounters()
        tunnel.writer.write(tunnel.session.send_reply(Reply.SUCCEEDED))
        try:
            pipe = DatagramPipe(tunnel.reader, tunnel.writer, self.udp_idle, counters)
            reason = await serve_dns(pipe, self.resolver)
            log.debug("%s: DNS session ended (%s)", label, reason)
        finally:
            self._count_datagrams(counters)
            log.debug(
                "%s: DNS done, %d messages from the client, %d answers",
                label,
                counters.datagrams_up,
                counters.datagrams_down,
            )

    async def _refuse(
        self, tunnel: Authenticated, label: str, dest: Address, outcome: Outcome
    ) -> None:
        if outcome.code == Reply.NOT_ALLOWED:
            self.stats.refused += 1
            log.info("%s: refused %s: %s", label, dest, outcome.detail)
        else:
            self.stats.unreachable += 1
            log.debug("%s: cannot reach %s: %s", label, dest, outcome.detail)
        await self._reply(tunnel, outcome.code)

    @staticmethod
    async def _serve_info(tunnel: Authenticated) -> None:
        """What ``braid doctor`` asks of the server: its version and MPTCP limits."""
        from braid import __version__

        limits = await asyncio.to_thread(read_mptcp_limits)
        info = json.dumps({"version": __version__, "mptcp_limits": limits}).encode()
        writer = tunnel.writer
        writer.write(tunnel.session.send_reply(Reply.SUCCEEDED))
        writer.write(tunnel.session.send_data(info))
        writer.write(tunnel.session.send_end())
        await writer.drain()
        await close_writer(writer)

    @staticmethod
    async def _reply(tunnel: Authenticated, code: Reply) -> None:
        """Send a failure REPLY and close the tunnel cleanly, so the client reads it."""
        tunnel.writer.write(tunnel.session.send_reply(code))
        await tunnel.writer.drain()
        await close_writer(tunnel.writer)

    # --- destinations -----------------------------------------------------------------

    async def _allowed(self, dest: Address, deadline: float) -> list[tuple[int, tuple]] | Outcome:
        """Resolve ``dest`` and keep the addresses the policy allows; else why none is."""
        try:
            async with asyncio.timeout_at(deadline):
                candidates = await self._resolve(dest)
        except TimeoutError:
            return Outcome(Reply.TIMED_OUT, "name resolution timed out")
        except (socket.gaierror, UnicodeError) as exc:
            return Outcome(Reply.HOST_UNREACHABLE, f"cannot resolve {dest.host}: {exc}")
        own = self.own.get()
        allowed: list[tuple[int, tuple]] = []
        refusals: list[str] = []
        for family, sockaddr in candidates:
            why = judge(sockaddr[0], self.policy, own)
            if why is None:
                allowed.append((family, sockaddr))
            else:
                refusals.append(f"{sockaddr[0]} ({why})")
        if not allowed:
            return Outcome(Reply.NOT_ALLOWED, "; ".join(refusals) or "no address")
        return allowed

    async def _connect(self, dest: Address) -> Outcome:
        """Resolve, check every address against the policy, connect to the first that answers."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.timeouts.connect
        allowed = await self._allowed(dest, deadline)
        if isinstance(allowed, Outcome):
            return allowed
        failures: list[tuple[Reply, str]] = []
        for index, (family, sockaddr) in enumerate(allowed):
            # Each address gets an equal share of the time left, so one that
            # drops packets cannot use up the whole budget.
            share = (deadline - loop.time()) / (len(allowed) - index)
            try:
                sock = await self._try_connect(family, sockaddr, loop.time() + share)
            except TimeoutError:
                failures.append((Reply.TIMED_OUT, f"{sockaddr[0]}: timed out"))
            except OSError as exc:
                code = _ERRNO_REPLY.get(exc.errno or 0, Reply.GENERAL_FAILURE)
                reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
                failures.append((code, f"{sockaddr[0]}: {reason}"))
            else:
                return Outcome(Reply.SUCCEEDED, "", sock)
        code = min((c for c, _ in failures), key=_REPLY_RANK.index)
        return Outcome(code, "; ".join(d for _, d in failures))

    async def _open_udp(self, dest: Address) -> Outcome:
        """A UDP socket connected to the first address of ``dest`` the policy allows.

        Connecting a UDP socket sends nothing; it fixes the peer, so the
        kernel only hands us datagrams from it, and fails at once when there
        is no route.
        """
        loop = asyncio.get_running_loop()
        allowed = await self._allowed(dest, loop.time() + self.config.timeouts.connect)
        if isinstance(allowed, Outcome):
            return allowed
        failures: list[tuple[Reply, str]] = []
        for family, sockaddr in allowed:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.connect(sockaddr)
            except OSError as exc:
                sock.close()
                code = _ERRNO_REPLY.get(exc.errno or 0, Reply.GENERAL_FAILURE)
                reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
                failures.append((code, f"{sockaddr[0]}: {reason}"))
            else:
                return Outcome(Reply.SUCCEEDED, "", sock)
        code = min((c for c, _ in failures), key=_REPLY_RANK.index)
        return Outcome(code, "; ".join(d for _, d in failures))

    async def _resolve(self, dest: Address) -> list[tuple[int, tuple]]:
        if not dest.is_name:
            ip = normalise(dest.host)
            family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            return [(family, (str(ip), dest.port))]
        infos = await asyncio.get_running_loop().getaddrinfo(
            dest.host, dest.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        out: list[tuple[int, tuple]] = []
        for family, _, _, _, sockaddr in infos:
            if (family, sockaddr) not in out:
                out.append((family, sockaddr))
        return out

    @staticmethod
    async def _try_connect(family: int, sockaddr: tuple, deadline: float) -> socket.socket:
        loop = asyncio.get_running_loop()
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            async with asyncio.timeout_at(deadline):
                await loop.sock_connect(sock, sockaddr)
        except BaseException:
            sock.close()
            raise
        return sock


__all__ = [
    "BraidServer",
    "ListenError",
    "Stats",
    "WarningLimiter",
    "open_listener",
    "udp_idle_timeout",
]
