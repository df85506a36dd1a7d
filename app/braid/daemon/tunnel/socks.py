"""The SOCKS5 port: each accepted connection rides its own tunnel connection.

Connections are capped per local user (the owner of the application's socket, asked of the
kernel) and in all, with a reserve for root, so that no user can take braidd's descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from collections.abc import Callable

from braid.daemon import limits
from braid.protocol.address import Address
from braid.protocol.socks5 import (
    SocksCommand,
    SocksError,
    SocksServerConnection,
    encode_reply,
)
from braid.protocol.tunnel import Reply, frame_header
from braid.transport import RelayCounters, close_writer, relay
from braid.tunnel_client import TunnelError

log = logging.getLogger(__name__)

#: The listen backlog, which is also how many pending connections asyncio accepts at one wake-up
#: before any handler runs: a burst over the caps is refused a moment later, not at accept.
ACCEPT_BACKLOG = 512

HANDSHAKE_TIMEOUT = 10.0


def parse_listen(text: str) -> tuple[str, int]:
    """ADDR:PORT or [V6]:PORT."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected ADDR:PORT, got {text!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


class SocksServer:
    """Accepts SOCKS5 CONNECT on a loopback address and relays through tunnels.

    ``take_tunnel`` returns an authenticated tunnel, or raises TunnelError
    when Braid is not connected.
    """

    def __init__(self, listen: tuple[str, int], take_tunnel: Callable) -> None:
        self.listen = listen
        self._take_tunnel = take_tunnel
        self._server: asyncio.base_events.Server | None = None
        self._flows: set[asyncio.Task] = set()
        self.counters = RelayCounters()
        self.flows_total = 0
        self.flows_failed = 0
        # Set by the daemon: serves a SOCKS5 UDP ASSOCIATE on the control connection.
        self.udp_associate = None
        self.caps: limits.ConnectionCaps | None = None  # set at start, from the descriptors
        self._owners = limits.SocketOwners()
        self._throttled = limits.Throttled(log)  # any local user can make these lines

    @property
    def address(self) -> str:
        host, port = self.listen
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def active_flows(self) -> int:
        return len(self._flows)

    def track(self, task: asyncio.Task) -> None:
        """Count a flow accepted elsewhere (the transparent listener) as active."""
        self._flows.add(task)
        task.add_done_callback(self._flows.discard)

    async def start(self) -> None:
        self.caps = limits.socks_caps()
        host, port = self.listen
        self._server = await asyncio.start_server(
            self._accept, host, port, reuse_address=True, backlog=ACCEPT_BACKLOG
        )
        sock = self._server.sockets[0]
        self.listen = sock.getsockname()[:2]
        log.info("SOCKS5 listening on %s", self.address)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._flows):
            task.cancel()
        if self._flows:
            await asyncio.gather(*self._flows, return_exceptions=True)
        self._owners.close()

    def admit(
        self, writer: asyncio.StreamWriter, remote: tuple[str, int] | None = None
    ) -> Callable[[], None] | None:
        """Count a new flow against its owner's cap: a function that gives its place back, or
        None if refused. The owner is that of the application's socket, whose remote end is
        ``remote`` (default: this listener's address; a redirected flow passes its original
        destination)."""
        peer = writer.get_extra_info("peername")
        remote = remote or writer.get_extra_info("sockname")
        uid = self._owners.tcp_owner(peer[:2], remote[:2]) if peer and remote else None
        caps = self.caps
        if caps is None:
            return lambda: None
        if not caps.admit(uid):
            return None
        return functools.partial(caps.release, uid)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        release = self.admit(writer)
        if release is None:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._flows.add(task)
        try:
            await self._serve(reader, writer)
        except (OSError, asyncio.IncompleteReadError) as exc:
            # The application or the tunnel went away (reset, timeout, or ENOTCONN when the
            # stream is ended after the application has already gone).
            log.debug("flow ended: %s", exc)
        except asyncio.CancelledError:
            # braidd is stopping. Python 3.11's start_server logs a handler that ends
            # cancelled as an error with a traceback, so this one ends normally.
            pass
        finally:
            self._flows.discard(task)
            try:
                await close_writer(writer)
            finally:
                release()  # only once its descriptor is gone

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = SocksServerConnection()
        request = None
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                while request is None:
                    data = await reader.read(4096)
                    if not data:
                        return
                    out, request = conn.receive(data)
                    if out:
                        writer.write(out)
        except SocksError as exc:
            self._throttled("rejected", logging.INFO, "SOCKS5 client rejected: %s", exc)
            if exc.reply:
                writer.write(exc.reply)
            return
        if request.command is SocksCommand.UDP_ASSOCIATE and self.udp_associate is not None:
            await self.udp_associate(reader, writer, request.address)
            return
        if request.command is not SocksCommand.CONNECT:
            writer.write(encode_reply(Reply.COMMAND_NOT_SUPPORTED))
            return
        await self.carry(reader, writer, request.address, conn.leftover, socks_reply=True)

    async def carry(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        address: Address,
        early: bytes = b"",
        socks_reply: bool = False,
    ) -> None:
        """Carry one TCP flow to ``address`` over its own tunnel connection."""
        self.flows_total += 1
        try:
            tunnel = await self._take_tunnel()
        except TunnelError as exc:
            self._throttled("no tunnel", logging.INFO, "flow to %s: no tunnel: %s", address, exc)
            self.flows_failed += 1
            if socks_reply:
                writer.write(encode_reply(Reply.NETWORK_UNREACHABLE))
            else:
                writer.transport.abort()
            return
        # Pipelined, as a local proxy must be to cost no extra round trip: the request,
        # the client's first bytes and the success reply all go out at once. If the server
        # then refuses, the client's connection is reset instead of getting a reply code.
        tunnel.send_request(address)
        if early:
            tunnel.writer.writelines((frame_header(len(early)), early))
            self.counters.up += len(early)
        if socks_reply:
            writer.write(encode_reply(Reply.SUCCEEDED, Address("0.0.0.0", 0)))
        try:
            await relay(
                (reader, writer),
                (tunnel.reader, tunnel.writer),
                self.counters,
                before_tunnel_data=self._check_reply(tunnel, address),
                label=f"flow to {address}",
                on_data=tunnel.on_data,
            )
        except TunnelError as exc:
            self.flows_failed += 1
            log.info("flow to %s: %s", address, exc)

    async def _check_reply(self, tunnel, address: Address) -> None:
        reply = await tunnel.read_reply(address)
        if reply.code is not Reply.SUCCEEDED:
            raise TunnelError(f"refused by the server: {reply.code.describe()}")
