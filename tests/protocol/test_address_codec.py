"""SOCKS5-style destination addresses: encode, decode, partial input, garbage."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from braid.protocol.address import (
    ATYP_DOMAIN,
    ATYP_IPV4,
    ATYP_IPV6,
    Address,
    AddressError,
    decode_address,
    encode_address,
)

EXAMPLES = [
    (Address("198.18.0.1", 80), bytes([ATYP_IPV4, 198, 18, 0, 1, 0, 80])),
    (
        Address("2001:db8::1", 443),
        bytes([ATYP_IPV6]) + bytes.fromhex("20010db8" + "00" * 11 + "01") + b"\x01\xbb",
    ),
    (Address("example.org", 8080), bytes([ATYP_DOMAIN, 11]) + b"example.org" + b"\x1f\x90"),
]


@pytest.mark.parametrize(("address", "wire"), EXAMPLES)
def test_known_encodings(address: Address, wire: bytes) -> None:
    assert encode_address(address) == wire
    assert decode_address(wire) == (address, len(wire))


@pytest.mark.parametrize(("address", "wire"), EXAMPLES)
def test_every_prefix_is_incomplete(address: Address, wire: bytes) -> None:
    for n in range(len(wire)):
        assert decode_address(wire[:n]) is None


def test_offset_and_trailing_bytes() -> None:
    wire = b"\xff\xff" + encode_address(Address("10.0.0.1", 1)) + b"rest"
    assert decode_address(wire, 2) == (Address("10.0.0.1", 1), 2 + 7)


def test_ipv6_is_normalised_and_idna_round_trips() -> None:
    wire = encode_address(Address("2001:DB8:0:0::1", 1))
    assert decode_address(wire)[0].host == "2001:db8::1"  # type: ignore[index]
    idna = encode_address(Address("bücher.example", 80))
    assert b"xn--bcher-kva.example" in idna
    assert decode_address(idna)[0].host == "bücher.example"  # type: ignore[index]


def test_str_and_is_name() -> None:
    assert str(Address("2001:db8::1", 443)) == "[2001:db8::1]:443"
    assert str(Address("198.18.0.1", 80)) == "198.18.0.1:80"
    assert Address("example.org", 1).is_name
    assert not Address("::1", 1).is_name


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (b"\x05\x00\x00", 0x08),  # unknown address type
        (b"\x03\x00\x00\x50", 0x08),  # empty name
        (b"\x03\x03a b\x00\x50", 0x08),  # forbidden character
        (b"\x03\x02\xff\xfe\x00\x50", 0x08),  # not ASCII
    ],
)
def test_garbage_raises_address_error(wire: bytes, code: int) -> None:
    with pytest.raises(AddressError) as info:
        decode_address(wire)
    assert info.value.reply_code == code


@pytest.mark.parametrize(
    "address", [Address("1.2.3.4", 70000), Address("1.2.3.4", -1), Address("a" * 300, 1)]
)
def test_unencodable_addresses(address: Address) -> None:
    with pytest.raises(AddressError):
        encode_address(address)


hosts = st.one_of(
    st.ip_addresses().map(str),
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z]{2,8}){0,3}", fullmatch=True).filter(
        lambda h: "xn--" not in h  # would have to be valid punycode
    ),
)


@given(hosts, st.integers(0, 0xFFFF))
def test_round_trip(host: str, port: int) -> None:
    address = Address(host, port)
    wire = encode_address(address)
    assert decode_address(wire) == (address, len(wire))


@given(st.binary(max_size=300), st.integers(0, 4))
def test_fuzz_only_address_errors(data: bytes, offset: int) -> None:
    try:
        result = decode_address(data, offset)
    except AddressError:
        return
    if result is not None:
        address, end = result
        assert offset < end <= len(data)
        assert 0 <= address.port <= 0xFFFF
