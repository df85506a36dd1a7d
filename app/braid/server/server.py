"""braid-server's listener: authenticate tunnels, connect to destinations, relay.

One connection carries one flow: TLS handshake, HELLO with the token, AUTH_OK,
then (after up to ``timeouts.idle`` in the client's warm pool) one REQUEST,
its REPLY, and the framed relay until both directions have ended. The flow
is a TCP stream (CONNECT), datagrams to one destination (UDP, see udp.py) or
DNS messages answered by the server's resolver (DNS, see dns.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import ssl
import time
from collections import Counter
from dataclasses import dataclass, fields

from braid import memory
from braid.aio import cancel_all, spawn
from braid.protocol.address import Address
from braid.protocol.tunnel import (
    AUTH_OK,
    Command,
    ProtocolError,
    Reply,
    Request,
    encode_reply,
    parse_hello,
    parse_request,
)
from braid.server.datagram import DatagramSessions
from braid.server.dns import Resolver, serve_dns
from braid.server.policy import judge, normalise
from braid.server.probe import start_probe_responder
from braid.server.state import (
    ServerConfig,
    StateDir,
    StateError,
    format_hostport,
    token_matches,
)
from braid.server.system import OwnAddresses
from braid.server.udp import DatagramCounters, DatagramPipe, relay_udp
from braid.transport import (
    MptcpUnavailable,
    RelayCounters,
    close_writer,
    is_mptcp,
    mptcp_socket,
    relay,
)
from braid.tunnel_client import read_message

log = logging.getLogger(__name__)

STATS_INTERVAL = 60.0
WARNING_INTERVAL = 10.0
UDP_IDLE = 120.0  # default of timeouts.udp_idle: UDP and DNS sessions without a datagram


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
    auth_failures: int = 0
    delayed: int = 0  # handshakes held back because their address kept failing
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
            f"{self.auth_failures} failed authentication ({self.delayed} delayed), "
            f"{self.requests} requests "
            f"({self.refused} refused, {self.unreachable} unreachable), "
            f"{self.bytes_up} bytes up, {self.bytes_down} bytes down, "
            f"{self.datagrams_up} datagrams up, {self.datagrams_down} datagrams down"
        )

    def add_datagrams(self, counters: DatagramCounters) -> None:
        self.bytes_up += counters.bytes_up
        self.bytes_down += counters.bytes_down
        self.datagrams_up += counters.datagrams_up
        self.datagrams_down += counters.datagrams_down


def udp_idle_timeout(config: ServerConfig, state: StateDir | None = None) -> float:
    """``timeouts.udp_idle`` in seconds (120 unless server.json says otherwise; a bad value is
    a StateError from :meth:`StateDir.load` already)."""
    return config.timeouts.udp_idle


class WarningLimiter:
    """At most one warning per source address per ``interval``, with a count of the rest.

    Scanners and a laptop with a stale token retry all the time; the log must
    show them without being flooded.
    """

    def __init__(self, interval: float = WARNING_INTERVAL, max_sources: int = 4096) -> None:
        self.interval = interval
        self.max_sources = max_sources
        self._last: dict[str, tuple[float, int]] = {}  # source -> (logged at, suppressed)

    def warn(self, source: str, message: str) -> bool:
        """Log ``message`` unless ``source`` was reported recently; True if logged."""
        now = time.monotonic()
        logged_at, suppressed = self._last.get(source, (-float("inf"), 0))
        if now - logged_at < self.interval:
            self._last[source] = (logged_at, suppressed + 1)
            return False
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


class Penalty:
    """Per-address back-off for failed authentications: 0 s for the first few, then doubling.

    Bounded in memory: the oldest addresses are forgotten first.
    """

    def __init__(
        self, free: int = 5, window: float = 300.0, maximum: float = 30.0, max_sources: int = 65536
    ) -> None:
        self.free = free
        self.window = window
        self.maximum = maximum
        self.max_sources = max_sources
        self._failures: dict[str, tuple[int, float]] = {}

    def delay(self, source: str) -> float:
        count, last = self._failures.get(source, (0, 0.0))
        if time.monotonic() - last > self.window:
            self._failures.pop(source, None)
            return 0.0
        if count < self.free:
            return 0.0
        return min(self.maximum, 0.5 * 2 ** (count - self.free))

    def failed(self, source: str) -> None:
        count, last = self._failures.pop(source, (0, 0.0))
        if time.monotonic() - last > self.window:
            count = 0
        self._failures[source] = (count + 1, time.monotonic())
        while len(self._failures) > self.max_sources:
            self._failures.pop(next(iter(self._failures)))

    def succeeded(self, source: str) -> None:
        self._failures.pop(source, None)


class TokenHash:
    """The stored token hash, re-read when server.json changes.

    So that ``braid-server init --new-token`` locks out the old token at once,
    without restarting the server.
    """

    def __init__(self, config: ServerConfig, state: StateDir | None) -> None:
        self._hash = config.token_sha256
        self._state = state
        self._mtime = self._stat()

    def _stat(self) -> int | None:
        if self._state is None:
            return None
        try:
            return os.stat(self._state.config_path).st_mtime_ns
        except OSError:
            return None

    def get(self) -> str:
        mtime = self._stat()
        if mtime is not None and mtime != self._mtime and self._state is not None:
            self._mtime = mtime
            try:
                self._hash = self._state.load().token_sha256
                log.info("the token was replaced: clients must pair again")
            except StateError as exc:
                log.warning("keeping the previous token: %s", exc)
        return self._hash


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
    ) -> None:
        self.config = config
        self.tls = tls
        self.listener = listener
        self.policy = config.policy()
        self.token = TokenHash(config, state)
        self.own = own_addresses or OwnAddresses()
        self.udp_idle = udp_idle_timeout(config, state)
        self.resolver = Resolver()
        self.stats = Stats()
        self.warnings = WarningLimiter()
        self.penalty = Penalty()
        self.datagrams = DatagramSessions(self._open_udp, self.udp_idle)
        self._clients: Counter[str] = Counter()  # authenticated tunnels open per address
        self._conns: set[asyncio.Task] = set()
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
            self.token.get,
            WarningLimiter().warn,
        )
        self.datagrams.attach(probes)
        accept = spawn(self._accept_loop(), "accept")
        ticker = spawn(self._stats_loop(), "stats")
        trimmer = spawn(memory.trim_periodically(), "malloc-trim")
        stopping = spawn(self._stop.wait(), "stop")
        try:
            await asyncio.wait([accept, stopping], return_when=asyncio.FIRST_COMPLETED)
            if accept.done() and not accept.cancelled() and accept.exception():
                raise accept.exception()  # type: ignore[misc]
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
            await cancel_all([accept, ticker, trimmer, stopping])
            self.listener.close()
            if probes is not None:
                probes.close()
            await cancel_all(list(self._conns))
            self._log_stats()

    def stop(self, sig: int | None = None) -> None:
        if sig is not None:
            log.info("%s: shutting down", signal.Signals(sig).name)
        if self._stop is not None:
            self._stop.set()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(self.listener)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("cannot accept connections: %s; retrying in 1 s", exc.strerror)
                    await asyncio.sleep(1)
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            # Small messages (AUTH_OK, REPLY, short frames) must not wait for
            # Nagle's algorithm and the peer's delayed ACK: that costs 40 ms.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = spawn(self._handle(sock, peer), f"conn {peer[0]}:{peer[1]}")
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

    # --- one connection ----------------------------------------------------------------

    async def _handle(self, sock: socket.socket, peer: tuple) -> None:
        source = str(normalise(peer[0]))
        label = format_hostport(source, peer[1])
        self.stats.connections += 1
        self.stats.active += 1
        writer: asyncio.StreamWriter | None = None
        try:
            streams = await self._authenticate(sock, source, label)
            if streams is None:
                return
            reader, writer = streams
            log.debug("%s: authenticated (mptcp=%s)", label, is_mptcp(sock))
            self._clients[source] += 1
            self.stats.clients = len(self._clients)
            await self._serve_request(reader, writer, label)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            log.debug("%s: connection lost: %r", label, exc)
        except ProtocolError as exc:
            log.info("%s: protocol error: %s", label, exc)
        except OSError as exc:
            log.info("%s: %s", label, exc)
        finally:
            self.stats.active -= 1
            if writer is not None:
                self._clients[source] -= 1
                if self._clients[source] <= 0:
                    del self._clients[source]
                self.stats.clients = len(self._clients)
            # Before authentication, _authenticate has already dropped the socket.
            if writer is not None and not writer.is_closing():
                await close_writer(writer, abort=True)

    async def _authenticate(
        self, sock: socket.socket, source: str, label: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        delay = self.penalty.delay(source)
        if delay:
            # An address that keeps failing waits before it may try again: guessing the
            # token becomes slow, while authenticated clients elsewhere are not affected.
            self.stats.delayed += 1
            await asyncio.sleep(delay)
        result = await self._handshake(sock, source, label)
        if result is None:
            self.penalty.failed(source)
        else:
            self.penalty.succeeded(source)
        return result

    async def _handshake(
        self, sock: socket.socket, source: str, label: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """TLS handshake and HELLO within the handshake timeout; None if refused.

        A refused peer is dropped without a byte of the protocol: it learns
        nothing about why, and a scanner cannot tell Braid from any TLS server.
        """
        loop = asyncio.get_running_loop()
        timeout = self.config.timeouts.handshake
        reader = asyncio.StreamReader(limit=2**17)
        protocol = asyncio.StreamReaderProtocol(reader)
        transport: asyncio.BaseTransport | None = None
        try:
            reason = ""
            try:
                async with asyncio.timeout(timeout):
                    transport, _ = await loop.connect_accepted_socket(
                        lambda: protocol, sock, ssl=self.tls, ssl_handshake_timeout=timeout
                    )
                    writer = asyncio.StreamWriter(transport, protocol, reader, loop)  # type: ignore[arg-type]
                    hello, _ = await read_message(reader, parse_hello)
            except TimeoutError:
                reason = f"no TLS handshake and HELLO within {timeout:g} s"
            except ssl.SSLError as exc:
                reason = f"TLS handshake failed ({exc.reason or exc})"
            except asyncio.IncompleteReadError:
                reason = "closed the connection without sending a HELLO"
            except ProtocolError as exc:
                reason = f"bad HELLO: {exc}"
            except OSError as exc:
                reason = f"connection failed: {exc.strerror or exc}"
            else:
                if token_matches(hello.token, self.token.get()):
                    writer.write(AUTH_OK)
                    await writer.drain()
                    return reader, writer
                reason = "wrong token"
        except BaseException:  # cancelled at shutdown, or the peer vanished after HELLO
            _drop(sock, transport)
            raise
        self.stats.auth_failures += 1
        self.warnings.warn(source, f"rejected {label}: {reason}")
        _drop(sock, transport)
        return None

    async def _serve_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, label: str
    ) -> None:
        idle = self.config.timeouts.idle
        try:
            async with asyncio.timeout(idle):
                first = await reader.readexactly(1)
                if first[0] not in Command._value2member_map_:
                    await self._reply(writer, Reply.COMMAND_NOT_SUPPORTED)
                    log.info("%s: unknown command %d", label, first[0])
                    return
                request, _ = await read_message(reader, parse_request, prefix=first)
        except TimeoutError:
            log.debug("%s: no request within %g s, closing the idle tunnel", label, idle)
            await close_writer(writer)
            return
        except asyncio.IncompleteReadError:
            log.debug("%s: the client closed an unused tunnel", label)
            await close_writer(writer)
            return
        except ProtocolError as exc:
            log.info("%s: bad request: %s", label, exc)
            await self._reply(writer, Reply.ADDRESS_TYPE_NOT_SUPPORTED)
            return

        self.stats.requests += 1
        if request.command == Command.CONNECT:
            await self._serve_connect(request, reader, writer, label)
        elif request.command == Command.UDP:
            await self._serve_udp(request, reader, writer, label)
        elif request.command == Command.DNS:
            await self._serve_dns(reader, writer, label)
        elif request.command == Command.DATAGRAM:
            await self.datagrams.serve(reader, writer, label)
        else:
            log.info("%s: unsupported command %s", label, request.command.name)
            await self._reply(writer, Reply.COMMAND_NOT_SUPPORTED)

    async def _serve_connect(
        self,
        request: Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        label: str,
    ) -> None:
        dest = request.address
        outcome = await self._connect(dest)
        if outcome.sock is None:
            await self._refuse(writer, label, dest, outcome)
            return

        target = outcome.sock
        host, port = target.getpeername()[:2]
        log.debug("%s: connected to %s (%s)", label, dest, format_hostport(host, port))
        try:
            plain = await asyncio.open_connection(sock=target, limit=2**17)
        except OSError as exc:
            target.close()
            await self._reply(writer, Reply.GENERAL_FAILURE)
            log.info("%s: lost the connection to %s at once: %s", label, dest, exc)
            return
        writer.write(encode_reply(Reply.SUCCEEDED, Address(str(normalise(host)), port)))
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
            self.stats.bytes_up += counters.up
            self.stats.bytes_down += counters.down
            log.debug("%s: %s done, %d bytes up, %d down", label, dest, counters.up, counters.down)

    async def _serve_udp(
        self,
        request: Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        label: str,
    ) -> None:
        dest = request.address
        outcome = await self._open_udp(dest)
        if outcome.sock is None:
            await self._refuse(writer, label, dest, outcome)
            return
        target = outcome.sock
        counters = DatagramCounters()
        try:
            host, port = target.getpeername()[:2]
            log.debug("%s: UDP to %s (%s)", label, dest, format_hostport(host, port))
            writer.write(encode_reply(Reply.SUCCEEDED, Address(str(normalise(host)), port)))
            pipe = DatagramPipe(reader, writer, self.udp_idle, counters)
            reason = await relay_udp(pipe, target)
            log.debug("%s: UDP to %s ended (%s)", label, dest, reason)
        finally:
            target.close()
            self.stats.add_datagrams(counters)
            log.debug(
                "%s: UDP to %s done, %d datagrams up, %d down",
                label,
                dest,
                counters.datagrams_up,
                counters.datagrams_down,
            )

    async def _serve_dns(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, label: str
    ) -> None:
        counters = DatagramCounters()
        writer.write(encode_reply(Reply.SUCCEEDED))
        try:
            pipe = DatagramPipe(reader, writer, self.udp_idle, counters)
            reason = await serve_dns(pipe, self.resolver)
            log.debug("%s: DNS session ended (%s)", label, reason)
        finally:
            self.stats.add_datagrams(counters)
            log.debug(
                "%s: DNS done, %d messages from the client, %d answers",
                label,
                counters.datagrams_up,
                counters.datagrams_down,
            )

    async def _refuse(
        self, writer: asyncio.StreamWriter, label: str, dest: Address, outcome: Outcome
    ) -> None:
        if outcome.code == Reply.NOT_ALLOWED:
            self.stats.refused += 1
            log.info("%s: refused %s: %s", label, dest, outcome.detail)
        else:
            self.stats.unreachable += 1
            log.debug("%s: cannot reach %s: %s", label, dest, outcome.detail)
        await self._reply(writer, outcome.code)

    async def _reply(self, writer: asyncio.StreamWriter, code: Reply) -> None:
        """Send a failure REPLY and close the tunnel cleanly, so the client reads it."""
        writer.write(encode_reply(code))
        await writer.drain()
        await close_writer(writer)

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
