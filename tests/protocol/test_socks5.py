"""The SOCKS5 state machine: fed bytes, it answers bytes and yields the request."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from braid.protocol.address import Address
from braid.protocol.socks5 import (
    SocksCommand,
    SocksError,
    SocksServerConnection,
    encode_reply,
)

GREETING = b"\x05\x01\x00"


def feed_all(data: bytes, step: int) -> tuple[bytes, object, SocksServerConnection]:
    conn = SocksServerConnection()
    out = b""
    request = None
    for i in range(0, len(data), step):
        sent, request = conn.receive(data[i : i + step])
        out += sent
        if request is not None:
            break
    return out, request, conn


@pytest.mark.parametrize("step", [1, 2, 3, 100])
@pytest.mark.parametrize(
    ("wire", "address"),
    [
        (b"\x01\xc6\x13\x00\x01\x00\x50", Address("198.19.0.1", 80)),
        (
            b"\x04" + bytes.fromhex("20010db800ff" + "00" * 9 + "01") + b"\x01\xbb",
            Address("2001:db8:ff::1", 443),
        ),
        (b"\x03\x10files.braid.test\x1f\x90", Address("files.braid.test", 8080)),
    ],
)
def test_connect_request_in_any_chunking(step, wire, address):
    out, request, conn = feed_all(GREETING + b"\x05\x01\x00" + wire + b"early", step)
    assert out == b"\x05\x00"
    assert request.command is SocksCommand.CONNECT
    assert request.address == address
    assert conn.leftover in (b"", b"early"[: len(conn.leftover)])


def test_early_data_is_kept():
    conn = SocksServerConnection()
    _out, request = conn.receive(GREETING + b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50GET /")
    assert request.address == Address("127.0.0.1", 80)
    assert conn.leftover == b"GET /"


def test_udp_associate_is_parsed_for_the_caller_to_refuse():
    _, request, _ = feed_all(GREETING + b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00", 100)
    assert request.command is SocksCommand.UDP_ASSOCIATE


def test_client_demanding_authentication_gets_no_acceptable_method():
    conn = SocksServerConnection()
    with pytest.raises(SocksError) as info:
        conn.receive(b"\x05\x01\x02")
    assert info.value.reply == b"\x05\xff"


def test_socks4_is_refused():
    with pytest.raises(SocksError):
        SocksServerConnection().receive(b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00")


def test_unknown_address_type_answers_address_type_not_supported():
    conn = SocksServerConnection()
    conn.receive(GREETING)
    with pytest.raises(SocksError) as info:
        conn.receive(b"\x05\x01\x00\x09\x00\x00")
    assert info.value.reply[1] == 0x08


def test_reply_encoding():
    assert encode_reply(0, Address("0.0.0.0", 0)) == b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"


@given(st.binary(max_size=300))
def test_garbage_never_crashes(data):
    conn = SocksServerConnection()
    with contextlib.suppress(SocksError):
        conn.receive(data)
