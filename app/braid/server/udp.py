"""Datagram sessions over a tunnel: Command.UDP relays to one destination.

A tunnel carries a byte stream, so each datagram travels as one frame (a
frame holds up to 65535 bytes, more than any UDP payload). A session ends
with the client's end-of-stream frame, or when no datagram has passed either
way for the idle timeout; the server then sends its own end-of-stream frame.
Nothing is queued on the server: when the client reads slowly, the kernel
drops datagrams from the destination, as any congested UDP path would.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from dataclasses import dataclass

from braid.aio import cancel_all
from braid.protocol.tunnel import EOF_FRAME, FRAME_MAX, FrameDecoder, frame_header
from braid.server.state import format_hostport
from braid.transport import READ_SIZE, close_writer

log = logging.getLogger(__name__)

# Errors a UDP socket reports for one datagram (ICMP from the destination, a
# full buffer, a datagram too big for the path): that datagram is lost, the
# session goes on, as it would for an application talking UDP directly.
TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.EHOSTDOWN,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EMSGSIZE,
        errno.ENOBUFS,
        errno.EAGAIN,
        errno.EPROTO,
    }
)


@dataclass
class DatagramCounters:
    datagrams_up: int = 0  # client -> destination
    datagrams_down: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


class DatagramPipe:
    """The tunnel side of a datagram session: frames in and out, and the idle clock."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        idle: float,
        counters: DatagramCounters | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.idle = idle
        self.counters = counters or DatagramCounters()
        self._decoder = FrameDecoder()
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()

    def touch(self) -> None:
        self._last = self._loop.time()

    async def receive(self) -> list[bytes] | None:
        """The client's next datagrams; None once it ended the stream.

        Raises TimeoutError when no datagram passed either way for ``idle``
        seconds, and ConnectionResetError when the tunnel closes without the
        end-of-stream frame.
        """
        while not self._decoder.eof:
            left = self._last + self.idle - self._loop.time()
            if left <= 0:
                raise TimeoutError
            try:
                # Cancelling read() loses nothing: unread bytes stay buffered.
                async with asyncio.timeout(left):
                    data = await self.reader.read(READ_SIZE)
            except TimeoutError:
                continue  # datagrams going down may have moved the deadline
            if not data:
                raise ConnectionResetError("the tunnel closed without ending the stream")
            frames = self._decoder.feed(data)
            if frames:
                self.touch()
                self.counters.datagrams_up += len(frames)
                self.counters.bytes_up += sum(map(len, frames))
                return frames
        return None

    async def send(self, datagram: bytes) -> None:
        """One datagram to the client; an empty one cannot be framed and is dropped."""
        if not datagram or len(datagram) > FRAME_MAX:
            return
        self.touch()
        self.counters.datagrams_down += 1
        self.counters.bytes_down += len(datagram)
        self.writer.writelines((frame_header(len(datagram)), datagram))
        await self.writer.drain()

    async def finish(self) -> None:
        """End our direction and close the tunnel cleanly."""
        self.writer.write(EOF_FRAME)
        await self.writer.drain()
        await close_writer(self.writer)


async def relay_udp(pipe: DatagramPipe, sock: socket.socket) -> str:
    """Relay between the client and a connected UDP socket; returns why the session ended.

    Raises what broke the tunnel (the caller then drops it); the socket is
    left to the caller to close.
    """
    down = asyncio.create_task(_udp_to_client(pipe, sock))
    up = asyncio.create_task(_client_to_udp(pipe, sock))
    try:
        done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_all([up, down])
    for task in (up, down):
        if task in done and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    reason = up.result()
    await pipe.finish()
    return reason


async def _client_to_udp(pipe: DatagramPipe, sock: socket.socket) -> str:
    loop = asyncio.get_running_loop()
    while True:
        try:
            frames = await pipe.receive()
        except TimeoutError:
            return "idle"
        if frames is None:
            return "ended by the client"
        for frame in frames:
            # A pending ICMP error is reported by the next send, which then
            # sends nothing: one more try sends the datagram after all.
            for _ in range(2):
                try:
                    await loop.sock_sendall(sock, frame)
                    break
                except OSError as exc:
                    if exc.errno not in TRANSIENT_ERRNOS:
                        raise
                    log.debug("datagram to %s: %s", _peer(sock), exc.strerror)


async def _udp_to_client(pipe: DatagramPipe, sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            datagram = await loop.sock_recv(sock, FRAME_MAX)
        except OSError as exc:
            if exc.errno not in TRANSIENT_ERRNOS:
                raise
            log.debug("datagrams from %s: %s", _peer(sock), exc.strerror)
            continue
        await pipe.send(datagram)


def _peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "the destination"
    return format_hostport(host, port)


__all__ = ["DatagramCounters", "DatagramPipe", "relay_udp"]
