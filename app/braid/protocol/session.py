"""One tunnel connection's session, as a state machine both ends drive (sans-IO).

The laptop (``Role.CLIENT``) and braid-server (``Role.SERVER``) each keep a
``TunnelSession``: what they send comes from its ``send_*`` methods, what they
receive goes into ``receive`` and comes out as events. Every step is checked
against the phase, so a message out of turn is a ``SessionError`` whatever end
made it, and an error says in which ``Phase`` it happened: callers decide by
the phase (and, for a bad request, by the reply it calls for), never by the
text of a message.

    phase           client sends / receives          server receives / sends
    HELLO           HELLO ->                         HelloReceived, then AUTH_OK or a close
    AUTHENTICATING  <- AUTH_OK: AuthAccepted
    READY           REQUEST ->                       RequestReceived (the tunnel may wait here)
    REQUESTED       <- REPLY: ReplyReceived          REPLY
    RELAY           frames both ways: DataReceived, StreamEnded (the peer's end frame)
    CLOSED          after a failure REPLY, or once both directions have ended

``wanted()`` says how many bytes the next message needs at least; a reader that
asks for exactly that many never takes a byte of what follows the message (the
relay's frames), and needs a handful of reads per message, not one per byte.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from braid.protocol.address import ATYP_DOMAIN, ATYP_IPV4, ATYP_IPV6, Address, AddressError
from braid.protocol.tunnel import (
    AUTH_OK,
    EOF_FRAME,
    MAGIC,
    Command,
    FrameDecoder,
    Hello,
    ProtocolError,
    Reply,
    ReplyMessage,
    Request,
    encode_hello,
    encode_reply,
    encode_request,
    frame_header,
    parse_auth_reply,
    parse_hello,
    parse_reply,
    parse_request,
)


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class Phase(enum.Enum):
    HELLO = "hello"  # the client has not sent its HELLO, or the server not read it
    AUTHENTICATING = "authenticating"  # HELLO sent: the client waits for AUTH_OK
    READY = "ready"  # authenticated: the client may send its one REQUEST
    REQUESTED = "requested"  # the REQUEST is on its way: the REPLY is awaited
    RELAY = "relay"  # the flow: frames both ways
    CLOSED = "closed"


class SessionError(ProtocolError):
    """The session cannot go on. ``phase`` is where it broke; ``closed`` is true when the
    peer closed the connection there (rather than sending something wrong); ``reply`` is
    the REPLY a server owes the client for a bad request, if any."""

    def __init__(
        self, message: str, phase: Phase, *, closed: bool = False, reply: Reply | None = None
    ) -> None:
        super().__init__(message)
        self.phase = phase
        self.closed = closed
        self.reply = reply


# --- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HelloReceived:
    hello: Hello


@dataclass(frozen=True, slots=True)
class AuthAccepted:
    pass


@dataclass(frozen=True, slots=True)
class RequestReceived:
    request: Request


@dataclass(frozen=True, slots=True)
class ReplyReceived:
    reply: ReplyMessage


@dataclass(frozen=True, slots=True)
class DataReceived:
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer sent its end-of-stream frame: nothing more comes from it."""


Event = HelloReceived | AuthAccepted | RequestReceived | ReplyReceived | DataReceived | StreamEnded


def _address_wants(buf: bytes | bytearray, offset: int) -> int:
    """Bytes an address starting at ``offset`` still needs (0: complete, or invalid)."""
    have = len(buf) - offset
    if have < 1:
        return 1
    atyp = buf[offset]
    if atyp == ATYP_IPV4:
        return max(0, 7 - have)
    if atyp == ATYP_IPV6:
        return max(0, 19 - have)
    if atyp == ATYP_DOMAIN:
        if have < 2:
            return 2 - have
        return max(0, 2 + buf[offset + 1] + 2 - have)
    return 0  # the parser says what is wrong with it


class TunnelSession:
    """The state of one tunnel connection at one end."""

    def __init__(self, role: Role) -> None:
        self.role = role
        self.phase = Phase.HELLO
        self._buf = bytearray()
        self._frames = FrameDecoder()
        self.sent_end = False  # our end-of-stream frame went out
        self.request: Request | None = None
        self._early = b""

    # --- what to send -----------------------------------------------------------------

    def send_hello(self, token: str | bytes) -> bytes:
        self._expect(Role.CLIENT, Phase.HELLO, "send a HELLO")
        data = encode_hello(token)
        self.phase = Phase.AUTHENTICATING
        return data

    def send_auth_ok(self) -> bytes:
        """The server accepts the HELLO it received (``HelloReceived`` moved it to READY)."""
        self._expect(Role.SERVER, Phase.READY, "accept a HELLO")
        return AUTH_OK

    def send_request(self, command: Command, address: Address) -> bytes:
        if not isinstance(command, Command):  # e.g. a timeout passed where it used to go
            raise TypeError(f"command must be a Command, not {command!r}")
        if self.role is Role.CLIENT and self.phase is Phase.REQUESTED:
            raise RuntimeError("a tunnel carries a single request")
        self._expect(Role.CLIENT, Phase.READY, "send a request")
        data = encode_request(command, address)
        self.request = Request(command, address)
        self.phase = Phase.REQUESTED
        return data

    def send_reply(self, code: Reply, address: Address | None = None) -> bytes:
        """The server's answer to the request: on success the flow begins, else the session ends."""
        self._expect(Role.SERVER, Phase.REQUESTED, "send a reply")
        data = encode_reply(code, address)
        self.phase = Phase.RELAY if code is Reply.SUCCEEDED else Phase.CLOSED
        if self._buf and self.phase is Phase.RELAY:
            # Pipelined flow data fed before the REPLY: the next receive() hands it out.
            self._early = bytes(self._buf)
        self._buf.clear()
        return data

    def send_data(self, data: bytes) -> bytes:
        """One frame (up to 65535 bytes; an empty chunk is nothing to send)."""
        self._sending_frames()
        return frame_header(len(data)) + data if data else b""

    def send_end(self) -> bytes:
        """The end-of-stream frame: nothing more from us."""
        self._sending_frames()
        self.sent_end = True
        if self._frames.eof:
            self.phase = Phase.CLOSED
        return EOF_FRAME

    def _sending_frames(self) -> None:
        # The client may pipeline flow data right behind its REQUEST.
        if self.phase is Phase.REQUESTED and self.role is Role.CLIENT:
            return
        if self.phase is not Phase.RELAY:
            raise SessionError(f"cannot send flow data in phase {self.phase.value}", self.phase)
        if self.sent_end:
            raise SessionError("the end-of-stream frame was sent already", self.phase)

    # --- what was received ------------------------------------------------------------

    def wanted(self) -> int:
        """Bytes the next message needs at least; in RELAY, 0 (frames: read what comes)."""
        buf = self._buf
        if self.phase is Phase.HELLO and self.role is Role.SERVER:
            head = len(MAGIC) + 2
            if len(buf) < head:
                return head - len(buf)
            return max(0, head + buf[head - 1] - len(buf))
        if self.phase is Phase.AUTHENTICATING:
            return max(0, len(AUTH_OK) - len(buf))
        if self.phase is Phase.READY and self.role is Role.SERVER:
            return 1 if not buf else _address_wants(buf, 1)
        if self.phase is Phase.REQUESTED and self.role is Role.CLIENT:
            return 1 if not buf else _address_wants(buf, 1)
        return 0

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; the events they complete, in order."""
        if self._early:
            data, self._early = self._early + data, b""
        if not data:
            return []
        if self.phase is Phase.RELAY:
            return self._receive_frames(data)
        self._buf += data
        events: list[Event] = []
        while self._buf and self.phase is not Phase.RELAY:
            event = self._message()
            if event is None:
                return events
            events.append(event)
        if self._buf and self.phase is Phase.RELAY:
            rest, self._buf = bytes(self._buf), bytearray()
            events += self._receive_frames(rest)
        return events

    def receive_eof(self) -> None:
        """The peer closed the connection. Raises SessionError unless the session allows it:
        a server's idle tunnel may be closed by its client, and a finished flow by anyone."""
        if self.phase is Phase.CLOSED and self._frames.eof:
            return
        if self.phase is Phase.READY and self.role is Role.SERVER and not self._buf:
            self.phase = Phase.CLOSED  # an unused warm tunnel, closed by the client
            raise SessionError("closed without a request", Phase.READY, closed=True)
        phase = self.phase
        self.phase = Phase.CLOSED
        raise SessionError(f"the connection closed in phase {phase.value}", phase, closed=True)

    def _message(self) -> Event | None:
        buf = bytes(self._buf)
        phase = self.phase
        try:
            if phase is Phase.HELLO and self.role is Role.SERVER:
                parsed = parse_hello(buf)
                if parsed is None:
                    return None
                hello, used = parsed
                self.phase = Phase.READY
                del self._buf[:used]
                return HelloReceived(hello)
            if phase is Phase.AUTHENTICATING:
                used = parse_auth_reply(buf)
                if used is None:
                    return None
                self.phase = Phase.READY
                del self._buf[:used]
                return AuthAccepted()
            if phase is Phase.READY and self.role is Role.SERVER:
                if buf[0] not in Command._value2member_map_:
                    self.phase = Phase.CLOSED
                    raise SessionError(
                        f"unknown command {buf[0]}", phase, reply=Reply.COMMAND_NOT_SUPPORTED
                    )
                parsed_request = parse_request(buf)
                if parsed_request is None:
                    return None
                request, used = parsed_request
                self.request = request
                self.phase = Phase.REQUESTED
                del self._buf[:used]
                return RequestReceived(request)
            if phase is Phase.REQUESTED and self.role is Role.CLIENT:
                parsed_reply = parse_reply(buf)
                if parsed_reply is None:
                    return None
                reply, used = parsed_reply
                self.phase = Phase.RELAY if reply.code is Reply.SUCCEEDED else Phase.CLOSED
                del self._buf[:used]
                return ReplyReceived(reply)
            if phase is Phase.REQUESTED and self.role is Role.SERVER:
                return None  # flow data the client pipelined: kept until the REPLY is sent
        except SessionError:
            raise
        except (ProtocolError, AddressError) as exc:
            self.phase = Phase.CLOSED
            reply = Reply.ADDRESS_TYPE_NOT_SUPPORTED if phase is Phase.READY else None
            raise SessionError(str(exc), phase, reply=reply) from None
        raise SessionError(f"the {self.role.value} expects nothing in phase {phase.value}", phase)

    def _receive_frames(self, data: bytes) -> list[Event]:
        try:
            chunks = self._frames.feed(data)
        except ProtocolError as exc:
            phase, self.phase = self.phase, Phase.CLOSED
            raise SessionError(str(exc), phase) from None
        events: list[Event] = [DataReceived(chunk) for chunk in chunks]
        if self._frames.eof:
            events.append(StreamEnded())
            if self.sent_end:
                self.phase = Phase.CLOSED
        return events

    def _expect(self, role: Role, phase: Phase, what: str) -> None:
        if self.role is not role:
            raise SessionError(f"the {self.role.value} does not {what}", self.phase)
        if self.phase is not phase:
            raise SessionError(f"cannot {what} in phase {self.phase.value}", self.phase)


__all__ = [
    "AuthAccepted",
    "DataReceived",
    "Event",
    "HelloReceived",
    "Phase",
    "ReplyReceived",
    "RequestReceived",
    "Role",
    "SessionError",
    "StreamEnded",
    "TunnelSession",
]
