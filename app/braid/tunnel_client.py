"""The laptop's end of a tunnel connection to braid-server.

``open_tunnel`` connects (over MPTCP where the kernel has it), pins the
server's certificate, authenticates with the token and returns a ``Tunnel``
that may wait, warm, in a pool until ``request`` asks for a destination.
Every failure is a ``TunnelError`` whose message is written for the user.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import errno
import ipaddress
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Sequence

from braid.protocol.address import Address
from braid.protocol.pairing import Pairing
from braid.protocol.session import (
    AuthAccepted,
    DataReceived,
    Phase,
    ReplyReceived,
    Role,
    SessionError,
    StreamEnded,
    TunnelSession,
)
from braid.protocol.tunnel import Command, ReplyMessage
from braid.stall import fix_receive_buffer
from braid.transport import (
    READ_SIZE,
    MptcpUnavailable,
    client_tls_context,
    close_writer,
    fingerprint,
    is_mptcp,
    mptcp_socket,
    read_event,
)

log = logging.getLogger(__name__)

_warned_no_mptcp = False


class TunnelError(Exception):
    """A tunnel could not be opened or used; the message is meant for the user.

    ``fatal`` is true when retrying cannot help until the user acts: the
    server refused the token, or presented another certificate.
    """

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


class Tunnel:
    """An authenticated connection to braid-server that carries one flow."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        sock: socket.socket,
        server: str,
        session: TunnelSession,
    ) -> None:
        self.reader = reader
        self.writer = writer
        # The raw socket, for MPTCP introspection (MPTCP_INFO, subflows) only:
        # reading or writing it directly would bypass TLS.
        self.sock = sock
        self.server = server
        self.created = time.monotonic()
        self.local: tuple = writer.get_extra_info("sockname")
        self.session = session  # authenticated: in phase READY
        self._ended = False  # the server's end-of-stream frame arrived (datagram helpers)
        self._datagrams: collections.deque[bytes] = collections.deque()
        #: Told the size of every chunk the flow carries (braidd's path management).
        self.on_data: Callable[[int], None] | None = None

    @property
    def mptcp(self) -> bool:
        return is_mptcp(self.sock)

    @property
    def age(self) -> float:
        return time.monotonic() - self.created

    def is_alive(self) -> bool:
        """False once the server closed it (e.g. after its idle timeout) or we did."""
        return (
            not self.writer.is_closing()
            and not self.reader.at_eof()
            and self.reader.exception() is None
        )

    def send_request(self, address: Address, command: Command = Command.CONNECT) -> None:
        """Queue the REQUEST without waiting: flow data may follow it at once (pipelining)."""
        self.writer.write(self.session.send_request(command, address))

    async def read_reply(self, address: Address, timeout: float = 15) -> ReplyMessage:
        """Wait for the server's REPLY to the request for ``address``."""
        try:
            async with asyncio.timeout(timeout):
                await self.writer.drain()
                event = await read_event(self.reader, self.session)
            if not isinstance(event, ReplyReceived):  # the session allows nothing else here
                raise SessionError(f"unexpected {event}", Phase.REQUESTED)
        except TimeoutError:
            await self.close(abort=True)
            raise TunnelError(
                f"the server {self.server} did not answer the request for {address} "
                f"within {timeout:g} s"
            ) from None
        except ConnectionError as exc:
            await self.close(abort=True)
            raise TunnelError(
                f"the server {self.server} closed the tunnel before answering "
                f"the request for {address}" + _because(exc)
            ) from None
        except SessionError as exc:
            await self.close(abort=True)
            if exc.closed:
                raise TunnelError(
                    f"the server {self.server} closed the tunnel before answering "
                    f"the request for {address}"
                ) from None
            raise TunnelError(
                f"the server {self.server} answered with something that is not Braid's "
                f"protocol: {exc}"
            ) from None
        return event.reply

    async def request(
        self, address: Address, command: Command = Command.CONNECT, timeout: float = 15
    ) -> ReplyMessage:
        """Ask the server for a flow to ``address``; returns its reply, success or not.

        On success the tunnel now carries the flow: frames follow on
        ``reader``/``writer`` (see ``transport.relay``), or for UDP and DNS
        one datagram per frame (``send_datagram``, ``receive_datagram``).
        """
        self.send_request(address, command)
        return await self.read_reply(address, timeout)

    async def send_datagram(self, data: bytes) -> None:
        """One datagram (up to 65535 bytes) as one frame, for a UDP or DNS flow.

        An empty datagram is dropped: a frame of length 0 would end the stream.
        """
        if not data:
            return
        self.writer.write(self.session.send_data(data))
        await self.writer.drain()

    def queue_datagram(self, data: bytes, backlog: int = 1 << 20) -> bool:
        """Queue one datagram without waiting; dropped (False) while ``backlog`` bytes wait.

        UDP may lose datagrams; what it must not do is make the sender wait or buffer
        without bound, so the hot path writes and moves on.
        """
        if not data or self.writer.transport.get_write_buffer_size() > backlog:
            return False
        self.writer.write(self.session.send_data(data))
        return True

    async def end_datagrams(self) -> None:
        """Send the end-of-stream frame: the server then ends the session."""
        self.writer.write(self.session.send_end())
        await self.writer.drain()

    async def receive_datagram(self) -> bytes | None:
        """The next datagram from the server; None once it ended the stream.

        Raises TunnelError if the tunnel breaks without that end.
        """
        while not self._datagrams:
            if self._ended:
                return None
            try:
                data = await self.reader.read(READ_SIZE)
                if not data:
                    self.session.receive_eof()  # raises: the stream did not end
                for event in self.session.receive(data):
                    if isinstance(event, DataReceived):
                        self._datagrams.append(event.data)
                    elif isinstance(event, StreamEnded):
                        self._ended = True
            except (OSError, SessionError) as exc:  # ssl.SSLError is an OSError
                await self.close(abort=True)
                if isinstance(exc, SessionError) and exc.closed:
                    exc = ConnectionResetError("closed without ending the stream")
                raise TunnelError(f"the tunnel to {self.server} broke{_because(exc)}") from None
        return self._datagrams.popleft()

    async def close(self, abort: bool = False) -> None:
        await close_writer(self.writer, abort=abort)


def _because(exc: BaseException) -> str:
    if isinstance(exc, asyncio.IncompleteReadError):
        return ""
    if isinstance(exc, OSError) and exc.errno:
        return f" ({os.strerror(exc.errno).lower()})"
    return f" ({exc})" if str(exc) else ""


def _token_refused(server: str) -> str:
    return (
        f"the server {server} closed the connection after the token was sent: the token "
        "is wrong or was replaced, or this device was removed (on the server, run "
        "braid-server device add NAME and pair again with the URI it prints)"
    )


class Stage(enum.Enum):
    """How far ``open_tunnel`` got: what its errors are told apart by."""

    RESOLVE = "resolving {host}"
    CONNECT = "connecting to {server}"
    TLS = "in the TLS handshake with {server}"
    AUTHENTICATE = "waiting for {server} to answer the HELLO"

    def describe(self, pairing: Pairing) -> str:
        return self.value.format(host=pairing.host, server=pairing.server)


def _short(fp: str) -> str:
    return fp[:16] + "…"


async def _candidates(
    host: str, port: int, family: int, family_hint: int | None
) -> list[tuple[int, tuple]]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(
            host, port, family=family, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except (socket.gaierror, UnicodeError) as exc:
        raise TunnelError(f"cannot resolve the server name {host}: {exc}") from None
    seen: set[tuple] = set()
    out: list[tuple[int, tuple]] = []
    for fam, _, _, _, sockaddr in infos:
        if (fam, sockaddr) not in seen:
            seen.add((fam, sockaddr))
            out.append((fam, sockaddr))
    if family_hint is not None:
        out.sort(key=lambda c: c[0] != family_hint)  # stable: keeps resolver order
    return out


def numeric_candidates(
    addresses: Sequence[str], port: int, family: int, family_hint: int | None
) -> list[tuple[int, tuple]]:
    """Connect candidates from numeric addresses, of ``family`` (AF_UNSPEC: any)."""
    out: list[tuple[int, tuple]] = []
    for address in addresses:
        fam = socket.AF_INET6 if ":" in address else socket.AF_INET
        if family in (socket.AF_UNSPEC, fam):
            out.append((fam, (address, port) if fam == socket.AF_INET else (address, port, 0, 0)))
    if family_hint is not None:
        out.sort(key=lambda c: c[0] != family_hint)
    return out


async def sock_connect(sock: socket.socket, sockaddr: tuple) -> None:
    """Connect a non-blocking socket to a numeric address.

    ``loop.sock_connect`` cannot be used on MPTCP sockets: it passes the
    socket's protocol (262) to getaddrinfo, which fails with EAI_SOCKTYPE.
    """
    loop = asyncio.get_running_loop()
    err = sock.connect_ex(sockaddr)
    if err in (errno.EINPROGRESS, errno.EAGAIN):
        ready = loop.create_future()
        fd = sock.fileno()
        loop.add_writer(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            loop.remove_writer(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def _new_socket(family: int, use_mptcp: bool) -> socket.socket:
    global _warned_no_mptcp
    if use_mptcp:
        try:
            return mptcp_socket(family)
        except MptcpUnavailable as exc:
            if not _warned_no_mptcp:
                log.warning("%s; using plain TCP, so links are not bonded", exc.strerror)
                _warned_no_mptcp = True
    return socket.socket(family, socket.SOCK_STREAM)


async def _connect(
    candidates: list[tuple[int, tuple]],
    server: str,
    deadline: float,
    bind: tuple[str, int] | None,
    bind_device: str | None,
    use_mptcp: bool,
    mark: int | None = None,
) -> socket.socket:
    """Connect to the first candidate that answers, giving each a fair share of the time left."""
    loop = asyncio.get_running_loop()
    errors: list[str] = []
    for index, (family, sockaddr) in enumerate(candidates):
        left = len(candidates) - index
        attempt_deadline = loop.time() + (deadline - loop.time()) / left
        sock = _new_socket(family, use_mptcp)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            fix_receive_buffer(sock)  # before the SYN; see braid.stall
            if mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            if bind_device:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, bind_device.encode())
            if bind:
                sock.bind(bind)
            async with asyncio.timeout_at(attempt_deadline):
                await sock_connect(sock, sockaddr)
            return sock
        except TimeoutError:
            sock.close()
            errors.append(f"{sockaddr[0]}: timed out")
        except OSError as exc:
            sock.close()
            if bind and exc.errno == errno.EADDRNOTAVAIL:
                raise TunnelError(
                    f"cannot use the local address {bind[0]}: it is not (or no longer) "
                    "configured on this machine"
                ) from None
            if bind_device and exc.errno in (errno.ENODEV, errno.EPERM):
                raise TunnelError(
                    f"cannot bind to the device {bind_device}: {exc.strerror}"
                ) from None
            reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            errors.append(f"{sockaddr[0]}: {reason}" if len(candidates) > 1 else reason)
        except BaseException:
            sock.close()
            raise
    if all(e.endswith("timed out") for e in errors):
        raise TunnelError(f"timed out connecting to {server}")
    raise TunnelError(f"cannot reach {server}: {'; '.join(errors)}")


async def open_tunnel(
    pairing: Pairing,
    *,
    family_hint: int | None = None,
    bind: tuple[str, int] | None = None,
    bind_device: str | None = None,
    timeout: float = 10.0,
    mptcp: bool = True,
    addresses: Sequence[str] | None = None,
    mark: int | None = None,
) -> Tunnel:
    """Connect to the paired server and authenticate; raises TunnelError.

    ``family_hint`` (AF_INET or AF_INET6) puts that family's addresses first.
    ``bind`` fixes the local address of the initial subflow, and with it the
    link it leaves from; then only server addresses of the same family are
    tried. ``mptcp=False`` forces plain TCP. ``addresses`` are the server's addresses, already
    resolved: the name is then not looked up again (braidd resolves it once, so that its tunnels
    never depend on a lookup that system-wide mode would send through them). ``mark`` is set
    with SO_MARK on the socket (braidd's own mark, which system-wide capture lets pass).
    """
    loop = asyncio.get_running_loop()
    server = pairing.server
    deadline = loop.time() + timeout
    family = socket.AF_UNSPEC
    if bind is not None:
        try:
            version = ipaddress.ip_address(bind[0]).version
        except ValueError:
            raise TunnelError(f"the local address {bind[0]!r} is not an IP address") from None
        family = socket.AF_INET if version == 4 else socket.AF_INET6
    stage = Stage.RESOLVE
    session = TunnelSession(Role.CLIENT)
    sock: socket.socket | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout_at(deadline):
            if addresses is None:
                candidates = await _candidates(pairing.host, pairing.port, family, family_hint)
            else:
                candidates = numeric_candidates(addresses, pairing.port, family, family_hint)
            if not candidates:
                kind = "IPv4" if family == socket.AF_INET else "IPv6"
                local = bind[0] if bind else ""
                raise TunnelError(f"{pairing.host} has no {kind} address to reach from {local}")
            stage = Stage.CONNECT
            sock = await _connect(candidates, server, deadline, bind, bind_device, mptcp, mark)
            stage = Stage.TLS
            handshake = asyncio.ensure_future(
                asyncio.open_connection(
                    sock=sock,
                    ssl=client_tls_context(),
                    server_hostname="",  # no SNI: the certificate is pinned, not checked by name
                    ssl_handshake_timeout=max(deadline - loop.time(), 0.001),
                    limit=2**17,
                )
            )
            try:
                reader, writer = await asyncio.shield(handshake)
            except asyncio.CancelledError:  # asyncio.timeout_at's too, inside the block
                _drop_when_done(handshake, sock)
                sock = None  # its transport closes it
                raise
            ssl_object = writer.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
            presented = fingerprint(der) if der else "nothing"
            if presented != pairing.fingerprint:
                raise TunnelError(
                    f"certificate fingerprint mismatch: expected {_short(pairing.fingerprint)}, "
                    f"server presented {_short(presented)} — is this the right server, "
                    "or was it re-initialised? (then pair again)",
                    fatal=True,
                )
            stage = Stage.AUTHENTICATE
            writer.write(session.send_hello(pairing.token))
            await writer.drain()
            event = await read_event(reader, session)
            if not isinstance(event, AuthAccepted):  # the session allows nothing else here
                raise SessionError(f"unexpected {event}", Phase.AUTHENTICATING)
    except TimeoutError:
        _discard(sock, writer)
        raise TunnelError(f"timed out {stage.describe(pairing)} (after {timeout:g} s)") from None
    except SessionError as exc:
        _discard(sock, writer)
        if exc.closed and exc.phase is Phase.AUTHENTICATING:
            raise TunnelError(_token_refused(server), fatal=True) from None
        raise TunnelError(
            f"{server} answered with something that is not Braid's protocol"
        ) from None
    except ConnectionError as exc:
        _discard(sock, writer)
        if stage is Stage.AUTHENTICATE:  # dropped after the HELLO: the token was refused
            raise TunnelError(_token_refused(server), fatal=True) from None
        raise TunnelError(
            f"{server} closed the connection {stage.describe(pairing)}{_because(exc)}"
        ) from None
    except ssl.SSLError as exc:
        _discard(sock, writer)
        if stage is Stage.AUTHENTICATE:  # a close without TLS goodbye
            raise TunnelError(_token_refused(server), fatal=True) from None
        raise TunnelError(
            f"the TLS handshake with {server} failed ({exc.reason or exc}): is it a braid-server?"
        ) from None
    except OSError as exc:
        _discard(sock, writer)
        raise TunnelError(f"error {stage.describe(pairing)}: {exc.strerror or exc}") from None
    except BaseException:
        _discard(sock, writer)
        raise
    assert sock is not None
    tunnel = Tunnel(reader, writer, sock, server, session)
    log.debug("tunnel to %s open from %s (mptcp=%s)", server, tunnel.local, tunnel.mptcp)
    return tunnel


def _drop_when_done(handshake: asyncio.Future, sock: socket.socket) -> None:
    """Drop the connection a TLS handshake makes once it ends: we were cancelled (or our
    deadline passed) while it ran.

    Cancelled inside ``open_connection``, asyncio would close the half-made TLS transport
    politely: a TLS goodbye, with the socket kept open and watched for up to 30 s. Closing the
    socket under that transport frees its descriptor number while the transport still claims
    it, and the next socket given that number cannot be watched ("File descriptor N is used by
    transport"). So the handshake is shielded from the cancellation; shutting the socket down
    (which keeps its descriptor) ends it within a loop turn or two, and what it made is aborted
    here when it ends: the transport closes its own socket."""

    def done(task: asyncio.Future) -> None:
        if task.cancelled():  # only when the loop itself is shutting down
            return
        if task.exception() is None:
            task.result()[1].transport.abort()
        else:  # the handshake failed: its transport, if it made one, is closed already
            with contextlib.suppress(OSError):
                sock.close()

    if handshake.done():
        done(handshake)
    else:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        handshake.add_done_callback(done)


def _discard(sock: socket.socket | None, writer: asyncio.StreamWriter | None) -> None:
    """Drop a half-made connection at once (a reset, no TLS goodbye)."""
    if writer is not None:
        writer.transport.abort()
    elif sock is not None:
        with contextlib.suppress(OSError):
            sock.close()


__all__ = ["Stage", "Tunnel", "TunnelError", "open_tunnel", "sock_connect"]
