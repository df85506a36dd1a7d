"""The probe datagram: round trip, rejection of anything not authentic, fuzzing."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from braid.protocol import probe
from braid.protocol.probe import Probe, ProbeType
from braid.server.state import hash_token

TOKEN = "x" * 43
KEY = probe.key_from_token(TOKEN)
NONCE = bytes(range(8))


def test_keys_agree_between_client_and_server() -> None:
    assert probe.key_from_hash(hash_token(TOKEN)) == KEY == hashlib.sha256(TOKEN.encode()).digest()


def test_request_and_reply_round_trip() -> None:
    data = probe.encode_request(KEY, 3, 2**32 - 1, 2**64 - 1, NONCE, sent_ms=2**64 - 1)
    assert len(data) == probe.SIZE and data.startswith(b"BRP2")
    request = probe.parse(KEY, data)
    assert request == Probe(ProbeType.REQUEST, 3, 2**32 - 1, 2**64 - 1, NONCE, 2**64 - 1)
    reply = probe.encode_reply(KEY, request)
    assert len(reply) == len(data)
    assert probe.parse(KEY, reply) == Probe(
        ProbeType.REPLY, 3, 2**32 - 1, 2**64 - 1, NONCE, 2**64 - 1
    )


def test_requests_carry_the_wall_clock_and_are_fresh_within_30_s() -> None:
    before = probe.now_ms()
    request = probe.parse(KEY, probe.encode_request(KEY, 0, 1, 2, NONCE))
    assert request is not None and before <= request.sent_ms <= probe.now_ms()
    assert probe.is_fresh(request)
    assert probe.is_fresh(request, request.sent_ms + 30_000)
    assert probe.is_fresh(request, request.sent_ms - 30_000)  # the client's clock runs ahead
    assert not probe.is_fresh(request, request.sent_ms + 30_001)
    assert not probe.is_fresh(request, request.sent_ms - 30_001)


def test_wrong_key_is_rejected() -> None:
    data = probe.encode_request(KEY, 0, 1, 2, NONCE)
    assert probe.parse(probe.key_from_token("y" * 43), data) is None


@pytest.mark.parametrize("index", range(probe.SIZE))
def test_any_changed_byte_is_rejected(index: int) -> None:
    data = bytearray(probe.encode_request(KEY, 1, 2, 3, NONCE))
    data[index] ^= 0x01
    assert probe.parse(KEY, bytes(data)) is None


def test_wrong_sizes_are_rejected() -> None:
    data = probe.encode_request(KEY, 1, 2, 3, NONCE)
    assert probe.parse(KEY, data[:-1]) is None
    assert probe.parse(KEY, data + b"\0") is None
    assert probe.parse(KEY, b"") is None


def test_unknown_type_is_rejected_even_with_a_valid_mac() -> None:
    body = bytearray(probe.encode_request(KEY, 1, 2, 3, NONCE)[:34])
    body[4] = 7
    forged = bytes(body) + probe._mac(KEY, bytes(body))
    assert probe.parse(KEY, forged) is None


def test_other_magic_is_rejected_even_with_a_valid_mac() -> None:
    body = b"BRP1" + probe.encode_request(KEY, 1, 2, 3, NONCE)[4:34]
    assert probe.parse(KEY, body + probe._mac(KEY, body)) is None


@pytest.mark.parametrize(
    ("link", "seq", "stamp", "nonce"),
    [(256, 0, 0, NONCE), (0, 2**32, 0, NONCE), (0, 0, -1, NONCE), (0, 0, 0, b"short")],
)
def test_out_of_range_fields_raise(link: int, seq: int, stamp: int, nonce: bytes) -> None:
    with pytest.raises(ValueError):
        probe.encode_request(KEY, link, seq, stamp, nonce)


@given(st.binary(max_size=100))
def test_parse_never_raises(data: bytes) -> None:
    assert probe.parse(KEY, data) is None


@given(st.binary(min_size=probe.SIZE - 4, max_size=probe.SIZE - 4))
def test_parse_never_accepts_forgeries(rest: bytes) -> None:
    assert probe.parse(KEY, b"BRP2" + rest) is None


@given(
    st.integers(0, 255),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1),
    st.binary(min_size=8, max_size=8),
    st.binary(min_size=1, max_size=64),
)
def test_round_trip_any_fields_and_key(link: int, seq: int, stamp: int, nonce: bytes, key: bytes):
    parsed = probe.parse(key, probe.encode_request(key, link, seq, stamp, nonce, sent_ms=stamp))
    assert parsed == Probe(ProbeType.REQUEST, link, seq, stamp, nonce, stamp)
