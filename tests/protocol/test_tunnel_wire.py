"""The tunnel protocol's messages and framing, sans IO."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from braid.protocol.address import Address, AddressError
from braid.protocol.tunnel import (
    AUTH_OK,
    EOF_FRAME,
    MAGIC,
    VERSION,
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

TOKEN = "k3y-" + "A" * 39


def test_hello_round_trip_and_trailing_bytes() -> None:
    wire = encode_hello(TOKEN)
    assert wire.startswith(MAGIC + bytes([VERSION, len(TOKEN)]))
    assert parse_hello(wire) == (Hello(VERSION, TOKEN.encode()), len(wire))
    assert parse_hello(wire + b"\x01more") == (Hello(VERSION, TOKEN.encode()), len(wire))


def test_hello_prefixes_are_incomplete() -> None:
    wire = encode_hello(TOKEN)
    for n in range(len(wire)):
        assert parse_hello(wire[:n]) is None


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"GET / HTTP/1.1\r\n", "not a Braid client"),
        (b"BRX", "not a Braid client"),
        (b"\x16\x03\x01", "not a Braid client"),
        (MAGIC + bytes([VERSION + 1, 3]) + b"abc", "unsupported protocol version"),
        (MAGIC + bytes([VERSION, 0]), "empty token"),
    ],
)
def test_bad_hello(wire: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_hello(wire)


@pytest.mark.parametrize("token", ["", "x" * 256])
def test_hello_token_length_is_checked(token: str) -> None:
    with pytest.raises(ValueError):
        encode_hello(token)


def test_auth_ok() -> None:
    assert parse_auth_reply(AUTH_OK) == len(AUTH_OK)
    assert parse_auth_reply(AUTH_OK + EOF_FRAME) == len(AUTH_OK)
    for n in range(len(AUTH_OK)):
        assert parse_auth_reply(AUTH_OK[:n]) is None
    with pytest.raises(ProtocolError):
        parse_auth_reply(b"HTTP/1.1 400")
    with pytest.raises(ProtocolError):
        parse_auth_reply(MAGIC + bytes([VERSION, 1]))


@pytest.mark.parametrize(
    "address", [Address("198.18.0.1", 80), Address("2001:db8::1", 443), Address("a.example", 1)]
)
def test_request_and_reply_round_trip(address: Address) -> None:
    wire = encode_request(Command.CONNECT, address)
    assert parse_request(wire + b"\x00\x05") == (Request(Command.CONNECT, address), len(wire))
    for n in range(len(wire)):
        assert parse_request(wire[:n]) is None
    reply = encode_reply(Reply.SUCCEEDED, address)
    assert parse_reply(reply) == (ReplyMessage(Reply.SUCCEEDED, address), len(reply))
    for n in range(len(reply)):
        assert parse_reply(reply[:n]) is None


@pytest.mark.parametrize(
    ("command", "address"),
    [
        (Command.UDP, Address("198.18.0.1", 53)),
        (Command.UDP, Address("2001:db8::1", 443)),
        (Command.UDP, Address("a.example", 4500)),
        (Command.DNS, Address("0.0.0.0", 53)),
    ],
)
def test_datagram_commands_round_trip(command: Command, address: Address) -> None:
    wire = encode_request(command, address)
    assert wire[0] == command.value
    assert parse_request(wire + frame_header(3) + b"abc") == (Request(command, address), len(wire))
    for n in range(len(wire)):
        assert parse_request(wire[:n]) is None


def test_command_values_are_fixed() -> None:
    """The values are on the wire: 2 (SOCKS's BIND) stays unused, 3, 4, 5 and 6 never move."""
    assert [int(c) for c in Command] == [1, 3, 4, 5, 6, 7]
    with pytest.raises(ProtocolError, match="unknown command 2"):
        parse_request(b"\x02\x01\x01\x02\x03\x04\x00\x50")


def test_datagrams_are_one_frame_each() -> None:
    """UDP and DNS carry one datagram per frame: boundaries survive any split."""
    datagrams = [bytes([i]) * (i * 37 % 1400 + 1) for i in range(20)]
    wire = b"".join(frame_header(len(d)) + d for d in datagrams) + EOF_FRAME
    decoder = FrameDecoder()
    out: list[bytes] = []
    for i in range(0, len(wire), 100):
        out += decoder.feed(wire[i : i + 100])
    assert out == datagrams and decoder.eof


def test_failure_reply_has_a_zero_address() -> None:
    wire = encode_reply(Reply.NOT_ALLOWED)
    assert parse_reply(wire) == (
        ReplyMessage(Reply.NOT_ALLOWED, Address("0.0.0.0", 0)),
        len(wire),
    )


def test_every_reply_code_has_a_description() -> None:
    for code in Reply:
        assert code.describe()


@pytest.mark.parametrize("wire", [b"\x09\x01\x01\x02\x03\x04\x00\x50", b"\x01\x07"])
def test_bad_request(wire: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_request(wire)


def test_bad_reply() -> None:
    with pytest.raises(ProtocolError, match="unknown reply code"):
        parse_reply(b"\x42")
    with pytest.raises(ProtocolError):
        parse_reply(b"\x00\x09")


def test_frames_split_anywhere() -> None:
    chunks = [b"a", b"bc" * 1000, bytes(0xFFFF)]
    wire = b"".join(frame_header(len(c)) + c for c in chunks) + EOF_FRAME
    for step in (1, 2, 3, 7, 1000, len(wire)):
        decoder = FrameDecoder()
        out = []
        for i in range(0, len(wire), step):
            out += decoder.feed(wire[i : i + step])
        assert b"".join(out) == b"".join(chunks)
        assert decoder.eof and decoder.pending == 0


def test_nothing_may_follow_the_end_of_stream() -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(EOF_FRAME + b"\x00")
    decoder = FrameDecoder()
    decoder.feed(EOF_FRAME)
    assert decoder.feed(b"") == []
    with pytest.raises(ProtocolError):
        decoder.feed(b"x")


@pytest.mark.parametrize("length", [0, 0x10000])
def test_frame_header_range(length: int) -> None:
    with pytest.raises(ValueError):
        frame_header(length)


@given(st.lists(st.binary(min_size=1, max_size=300), max_size=10), st.integers(1, 50))
def test_frames_round_trip(chunks: list[bytes], step: int) -> None:
    wire = b"".join(frame_header(len(c)) + c for c in chunks) + EOF_FRAME
    decoder = FrameDecoder()
    out: list[bytes] = []
    for i in range(0, len(wire), step):
        out += decoder.feed(wire[i : i + step])
    assert out == chunks and decoder.eof


@given(
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=255)
)
def test_hello_round_trip_any_token(token: str) -> None:
    wire = encode_hello(token)
    assert parse_hello(wire) == (Hello(VERSION, token.encode()), len(wire))


PARSERS = [parse_hello, parse_auth_reply, parse_request, parse_reply]


@given(st.binary(max_size=400))
def test_fuzz_parsers_raise_only_protocol_errors(data: bytes) -> None:
    for parse in PARSERS:
        try:
            parse(data)
        except ProtocolError:
            pass
        except AddressError:  # pragma: no cover - must be wrapped
            pytest.fail(f"{parse.__name__} leaked an AddressError")


@given(st.lists(st.binary(max_size=100), max_size=8))
def test_fuzz_frame_decoder(parts: list[bytes]) -> None:
    decoder = FrameDecoder()
    try:
        for part in parts:
            for chunk in decoder.feed(part):
                assert 0 < len(chunk) <= 0xFFFF
    except ProtocolError:
        pass
