"""Sockets, TLS and the framed relay shared by braid-server and braidd."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import socket
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from braid.protocol.session import Event, TunnelSession
from braid.protocol.tunnel import EOF_FRAME, FRAME_MAX, FrameDecoder, frame_header
from braid.stall import GUARD

log = logging.getLogger(__name__)

IPPROTO_MPTCP = getattr(socket, "IPPROTO_MPTCP", 262)
SOL_MPTCP = 284
READ_SIZE = FRAME_MAX


class MptcpUnavailable(OSError):
    """The kernel refuses IPPROTO_MPTCP (too old, or net.mptcp.enabled=0)."""


def mptcp_socket(family: int) -> socket.socket:
    """A stream socket with IPPROTO_MPTCP; raises MptcpUnavailable if the kernel says no."""
    try:
        return socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP)
    except OSError as exc:
        if exc.errno in (errno.EPROTONOSUPPORT, errno.ENOPROTOOPT, errno.EINVAL):
            raise MptcpUnavailable(
                exc.errno,
                "this kernel does not offer Multipath TCP "
                "(needs Linux 5.6 or later and sysctl net.mptcp.enabled=1)",
            ) from None
        raise


MPTCP_INFO = 1


def mptcp_info(sock: socket.socket) -> bytes | None:
    """The connection's struct mptcp_info, or None if it is not (or no longer) MPTCP."""
    try:
        return sock.getsockopt(SOL_MPTCP, MPTCP_INFO, 256)
    except OSError:
        return None


def is_mptcp(sock: socket.socket) -> bool:
    """True while the connection really runs MPTCP (no fallback to plain TCP)."""
    return mptcp_info(sock) is not None


#: A tunnel that waited this long (seconds) between its handshake and its first flow gets its
#: congestion control started afresh (restart_congestion_control).
IDLE_RESTART = 1.0
_given_up = False  # a switch failed once: tunnels keep their algorithm from then on


def restart_congestion_control(sock: Any) -> bool:
    """Start the connection's congestion control afresh, as on a new connection.

    A pooled tunnel sits idle between its handshake and its flow. BBR (the default on many
    servers and laptops) keeps its round-trip estimate for 10 s; a connection that resumes
    sending later enters PROBE_RTT at its first acknowledgement, with a window of 4 packets
    for at least 200 ms: a 120 KiB answer then took 241 ms instead of 79 ms direct. Switching
    the connection to reno and back to its own algorithm re-initialises the algorithm's state
    on every subflow (the kernel ignores a switch to the algorithm a socket already has). Reno
    is normally open to every process, and a socket's own algorithm is normally the
    namespace's default, which is too. If either switch is refused (an administrator's
    ``tcp_allowed_congestion_control``, a route's ``congctl``), it gives up for good: later
    tunnels keep their algorithm untouched. True if it was restarted. Call it only while
    nothing is in flight."""
    global _given_up
    if _given_up:
        return False
    try:
        name = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).split(b"\0")[0]
    except (OSError, AttributeError):
        return False
    if not name or name == b"reno":
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"reno")
    except OSError:
        # On MPTCP the switch goes subflow by subflow: give back any that took reno.
        _given_up = True
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name)
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name)
    except OSError as exc:
        _given_up = True
        log.warning(
            "could not give a tunnel its congestion control %s back (%s); it runs reno, "
            "and later tunnels are left as they are",
            name.decode(errors="replace"),
            exc.strerror or exc,
        )
        return False
    return True


def fingerprint(der: bytes) -> str:
    """The pinning fingerprint: SHA-256 of the DER certificate, lower-case hex."""
    return hashlib.sha256(der).hexdigest()


def server_tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert_file, key_file)
    # Tickets would let a resumed session skip the certificate the client pins.
    # OP_NO_TICKET alone does not stop TLS 1.3 tickets (OpenSSL then sends
    # stateful ones); num_tickets = 0 does.
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    return ctx


def client_tls_context() -> ssl.SSLContext:
    """TLS 1.3 without CA checks: the client pins the certificate's fingerprint instead."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass
class RelayCounters:
    up: int = 0  # client -> destination
    down: int = 0  # destination -> client


OnData = Callable[[int], None]


def _ignore(count: int) -> None:
    pass


async def _plain_to_tunnel(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    count: list[int],
    on_data: OnData = _ignore,
) -> None:
    while True:
        data = await reader.read(READ_SIZE)
        if not data:
            writer.write(EOF_FRAME)
            await writer.drain()
            return
        count[0] += len(data)
        on_data(len(data))
        writer.writelines((frame_header(len(data)), data))
        await writer.drain()


async def _tunnel_to_plain(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    count: list[int],
    first: Coroutine[Any, Any, None] | None = None,
    on_data: OnData = _ignore,
) -> None:
    if first is not None:
        await first  # e.g. the server's REPLY, which precedes the frames
    decoder = FrameDecoder()
    while not decoder.eof:
        data = await reader.read(READ_SIZE)
        if not data:
            raise ConnectionResetError("the tunnel closed without ending the stream")
        chunks = decoder.feed(data)
        if chunks:
            carried = sum(map(len, chunks))
            count[0] += carried
            on_data(carried)
            writer.writelines(chunks)
            await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()
    await writer.drain()


async def relay(
    plain: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    tunnel: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    counters: RelayCounters | None = None,
    tunnel_is_client_side: bool = True,
    before_tunnel_data: Coroutine[Any, Any, None] | None = None,
    label: str = "flow",
    on_data: OnData | None = None,
) -> None:
    """Carry bytes both ways between a plain TCP stream and a framed tunnel stream.

    Returns when both directions have ended cleanly; on an error in either
    direction both connections are closed at once, so the far end sees a
    reset instead of a silently truncated stream. Meanwhile the stall guard
    watches the tunnel's socket (see :mod:`braid.stall`); ``label`` names the
    flow in what it logs. ``on_data`` hears the size of every chunk carried, either way (braidd
    spreads a flow onto more links once it is busy).
    """
    with GUARD.watching(tunnel[1].get_extra_info("socket"), label):
        await _relay(
            plain, tunnel, counters, tunnel_is_client_side, before_tunnel_data, on_data or _ignore
        )


async def _relay(
    plain: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    tunnel: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    counters: RelayCounters | None,
    tunnel_is_client_side: bool,
    before_tunnel_data: Coroutine[Any, Any, None] | None,
    on_data: OnData,
) -> None:
    counters = counters or RelayCounters()
    into_tunnel = [0]
    out_of_tunnel = [0]
    tasks = [
        asyncio.ensure_future(_plain_to_tunnel(plain[0], tunnel[1], into_tunnel, on_data)),
        asyncio.ensure_future(
            _tunnel_to_plain(tunnel[0], plain[1], out_of_tunnel, before_tunnel_data, on_data)
        ),
    ]
    clean = False
    try:
        done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = [t for t in done if t.exception() is not None]
        if failed:
            raise failed[0].exception()  # type: ignore[misc]
        clean = True
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if before_tunnel_data is not None:
            before_tunnel_data.close()  # never started if the other direction failed first
        if tunnel_is_client_side:
            counters.up += into_tunnel[0]
            counters.down += out_of_tunnel[0]
        else:
            counters.up += out_of_tunnel[0]
            counters.down += into_tunnel[0]
        await close_writer(plain[1], abort=not clean)
        await close_writer(tunnel[1], abort=not clean)


async def read_event(reader: asyncio.StreamReader, session: TunnelSession) -> Event:
    """The session's next message event, reading exactly the bytes it still needs, so that
    whatever follows the message (the flow's frames) stays in ``reader`` for the relay.

    Raises the session's SessionError: for bytes that are not the protocol, and (with
    ``closed`` set) when the peer closes before the message is complete.
    """
    while True:
        wanted = session.wanted()
        if wanted <= 0:
            raise RuntimeError(f"no message to read in phase {session.phase.value}")
        try:
            data = await reader.readexactly(wanted)
        except asyncio.IncompleteReadError as exc:
            session.receive(exc.partial)  # a garbled start is reported as such
            session.receive_eof()
            raise  # not reached: receive_eof raises for every phase that waits for a message
        events = session.receive(data)
        if events:
            return events[0]


async def close_writer(writer: asyncio.StreamWriter, abort: bool = False) -> None:
    """Close a stream, never raising; ``abort`` resets instead of a clean close.

    A clean close that takes over 5 s (a TLS peer that went away never answers close_notify),
    fails or is cancelled is aborted: the socket never outlives the call.
    """
    try:
        if abort:
            writer.transport.abort()
        else:
            writer.close()
        await asyncio.wait_for(writer.wait_closed(), 5)
    except asyncio.CancelledError:
        writer.transport.abort()
        raise
    except Exception:
        with contextlib.suppress(Exception):
            writer.transport.abort()
