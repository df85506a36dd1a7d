"""The tunnel session state machine: both ends driven by events, no sockets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from braid.protocol.address import Address
from braid.protocol.session import (
    AuthAccepted,
    DataReceived,
    HelloReceived,
    Phase,
    ReplyReceived,
    RequestReceived,
    Role,
    SessionError,
    StreamEnded,
    TunnelSession,
)
from braid.protocol.tunnel import (
    AUTH_OK,
    Command,
    Reply,
    encode_hello,
    encode_reply,
    encode_request,
)

TOKEN = "t" * 43


def feed_exactly(session: TunnelSession, data: bytes) -> tuple[list, int, bytes]:
    """Feed ``data`` the way the drivers read: exactly ``wanted()`` bytes at a time, until
    a message is complete. Returns the events, the number of reads, and what was left unread."""
    events: list = []
    reads, pos = 0, 0
    while not events and pos < len(data) and (n := session.wanted()) > 0:
        events += session.receive(data[pos : pos + n])
        pos += n
        reads += 1
    return events, reads, data[pos:]


def pair() -> tuple[TunnelSession, TunnelSession]:
    return TunnelSession(Role.CLIENT), TunnelSession(Role.SERVER)


def test_a_whole_session_both_ends() -> None:
    client, server = pair()
    hello = client.send_hello(TOKEN)
    assert client.phase is Phase.AUTHENTICATING
    [event] = server.receive(hello)
    assert event == HelloReceived(event.hello) and event.hello.token == TOKEN.encode()
    assert client.receive(server.send_auth_ok()) == [AuthAccepted()]
    assert client.phase is server.phase is Phase.READY
    request = client.send_request(Command.CONNECT, Address("example.org", 443))
    early = client.send_data(b"GET / HTTP/1.0\r\n\r\n")  # pipelined behind the request
    [event] = server.receive(request + early)
    assert event == RequestReceived(client.request)  # type: ignore[arg-type]
    reply = server.send_reply(Reply.SUCCEEDED, Address("192.0.2.1", 443))
    assert server.receive(b"") == [DataReceived(b"GET / HTTP/1.0\r\n\r\n")]
    events = client.receive(reply + server.send_data(b"HTTP/1.0 200") + server.send_end())
    assert [type(e) for e in events] == [ReplyReceived, DataReceived, StreamEnded]
    assert events[0].reply.code is Reply.SUCCEEDED and events[1] == DataReceived(b"HTTP/1.0 200")
    assert client.phase is Phase.RELAY  # the client has not ended its direction
    assert server.receive(client.send_end()) == [StreamEnded()]
    assert client.phase is server.phase is Phase.CLOSED
    client.receive_eof()  # a finished flow may be closed
    server.receive_eof()


def test_exact_reads_never_take_the_bytes_after_a_message() -> None:
    frames = b"\x00\x03abc"
    for address in (Address("198.18.0.1", 80), Address("2001:db8::1", 80), Address("a.b", 1)):
        client, server = pair()
        stream = client.send_hello(TOKEN) + frames
        events, reads, rest = feed_exactly(server, stream)
        assert [type(e) for e in events] == [HelloReceived] and rest == frames and reads == 2
        server.send_auth_ok()
        client.receive(AUTH_OK)
        stream = client.send_request(Command.CONNECT, address) + frames
        events, reads, rest = feed_exactly(server, stream)
        assert events == [RequestReceived(client.request)] and rest == frames  # type: ignore[arg-type]
        assert reads <= 4  # command, address type, (name length), the rest
        reply = server.send_reply(Reply.SUCCEEDED, address)
        events, reads, rest = feed_exactly(client, reply + frames)
        assert [type(e) for e in events] == [ReplyReceived] and rest == frames


def test_errors_carry_their_phase_and_the_reply_owed() -> None:
    client, server = pair()
    with pytest.raises(SessionError) as info:
        server.receive(b"GET / HTTP/1.1\r\n")
    assert info.value.phase is Phase.HELLO and not info.value.closed

    client, server = pair()
    server.receive(encode_hello(TOKEN))
    with pytest.raises(SessionError) as info:
        server.receive(b"\x09\x01\x00\x00\x00\x00\x00\x00")
    assert info.value.phase is Phase.READY and info.value.reply is Reply.COMMAND_NOT_SUPPORTED

    client, server = pair()
    server.receive(encode_hello(TOKEN))
    with pytest.raises(SessionError) as info:
        server.receive(b"\x01\x07\x00")
    assert info.value.reply is Reply.ADDRESS_TYPE_NOT_SUPPORTED

    client, server = pair()
    client.send_hello(TOKEN)
    with pytest.raises(SessionError) as info:  # the server dropped us: a refused token
        client.receive_eof()
    assert info.value.phase is Phase.AUTHENTICATING and info.value.closed


def test_a_warm_tunnel_closed_unused_is_told_apart() -> None:
    server = TunnelSession(Role.SERVER)
    server.receive(encode_hello(TOKEN))
    with pytest.raises(SessionError) as info:
        server.receive_eof()
    assert info.value.phase is Phase.READY and info.value.closed


def test_steps_out_of_turn_are_refused() -> None:
    client, server = pair()
    with pytest.raises(SessionError):
        client.send_request(Command.CONNECT, Address("a.b", 1))  # before authentication
    with pytest.raises(SessionError):
        server.send_auth_ok()  # no HELLO yet
    with pytest.raises(SessionError):
        server.send_hello(TOKEN)  # the server never says HELLO
    client.send_hello(TOKEN)
    client.receive(AUTH_OK)
    client.send_request(Command.DNS, Address("0.0.0.0", 53))
    with pytest.raises(RuntimeError, match="single request"):
        client.send_request(Command.DNS, Address("0.0.0.0", 53))
    with pytest.raises(TypeError):
        TunnelSession(Role.CLIENT).send_request(15, Address("a.b", 1))  # type: ignore[arg-type]


def test_a_failure_reply_ends_the_session() -> None:
    client, server = pair()
    server.receive(encode_hello(TOKEN))
    server.receive(encode_request(Command.CONNECT, Address("a.b", 1)))
    reply = server.send_reply(Reply.CONNECTION_REFUSED)
    [event] = client_after_request(client).receive(reply)
    assert event.reply.code is Reply.CONNECTION_REFUSED
    assert client.phase is server.phase is Phase.CLOSED
    with pytest.raises(SessionError):
        server.send_data(b"x")
    with pytest.raises(SessionError):
        client.receive(b"\x00\x01x")  # nothing may follow


def client_after_request(client: TunnelSession) -> TunnelSession:
    client.send_hello(TOKEN)
    client.receive(AUTH_OK)
    client.send_request(Command.CONNECT, Address("a.b", 1))
    return client


def test_a_flow_cut_before_its_end_frame_is_an_error() -> None:
    client = client_after_request(TunnelSession(Role.CLIENT))
    client.receive(encode_reply(Reply.SUCCEEDED))
    assert client.phase is Phase.RELAY
    with pytest.raises(SessionError) as info:
        client.receive_eof()
    assert info.value.phase is Phase.RELAY and info.value.closed


@given(st.binary(max_size=300), st.sampled_from(list(Role)))
def test_any_bytes_give_events_or_a_session_error(data: bytes, role: Role) -> None:
    session = TunnelSession(role)
    if role is Role.CLIENT:
        session.send_hello(TOKEN)
    try:
        session.receive(data)
        session.wanted()
    except SessionError as exc:
        assert isinstance(exc.phase, Phase)
