"""The datagram path's wire format: sealing, forgeries, the replay window and de-duplication."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from braid.protocol import datagram as dg
from braid.protocol.address import Address

SID, KEY = b"\x01" * 8, b"\x02" * 32


def pair() -> tuple[dg.Sealer, dg.Sealer]:
    return dg.Sealer(SID, KEY, dg.UP), dg.Sealer(SID, KEY, dg.DOWN)


def data(number: int, payload: bytes = b"voice", link: int = 0) -> dg.Packet:
    return dg.Packet(
        dg.Kind.DATA, link, 0b11, 1234, 0, 0, 7, number, Address("198.18.200.1", 9000), payload
    )


def test_a_packet_round_trips_both_ways() -> None:
    client, server = pair()
    sealed = client.seal(data(1))
    assert sealed.startswith(b"BD") and len(sealed) == dg.OVERHEAD + 7 + 5
    seq, packet = server.open(sealed)
    assert seq == 1 and packet == data(1)
    answer = dg.Packet(dg.Kind.DATA, 1, 0, 5, 1234, 10, 7, 1, None, b"back")
    assert client.open(server.seal(answer)) == (1, answer)


def test_forged_tampered_and_wrong_direction_packets_are_refused() -> None:
    client, server = pair()
    sealed = bytearray(client.seal(data(1)))
    for i in (3, 12, 20, len(sealed) - 1):  # session id, seq, ciphertext, tag
        forged = bytearray(sealed)
        forged[i] ^= 1
        assert server.open(bytes(forged)) is None
    assert client.open(bytes(sealed)) is None  # a reflected packet: the other direction's nonce
    other = dg.Sealer(SID, b"\x03" * 32, dg.UP)
    assert server.open(other.seal(data(1))) is None
    assert server.open(b"BD" + bytes(60)) is None


def test_sequence_numbers_never_repeat() -> None:
    client, server = pair()
    seqs = [server.open(client.seal(data(1)))[0] for _ in range(100)]
    assert seqs == list(range(1, 101))


def test_the_replay_window_accepts_each_number_once_even_out_of_order() -> None:
    window = dg.ReplayWindow(64)
    order = list(range(1, 200))
    random.Random(1).shuffle(order[:40])
    accepted = [n for n in order if window.check(n)]
    assert sorted(accepted) == list(range(1, 200))
    assert all(not window.check(n) for n in range(150, 200))  # all seen
    assert not window.check(100)  # too old: may have been seen and forgotten
    assert not window.check(0)


@given(st.lists(st.integers(min_value=1, max_value=5000), max_size=300))
def test_the_window_never_accepts_a_number_twice(numbers: list[int]) -> None:
    window = dg.ReplayWindow(256)
    accepted = [n for n in numbers if window.check(n)]
    assert len(accepted) == len(set(accepted))


def test_redundant_copies_are_delivered_once() -> None:
    client, server = pair()
    dedup, replay = dg.ReplayWindow(), dg.ReplayWindow()
    delivered = []
    for number in range(1, 51):
        for link in (0, 1):  # the same datagram on two links: new seq, same number
            seq, packet = server.open(client.seal(data(number, link=link)))
            if replay.check(seq) and dedup.check(packet.number):
                delivered.append(packet.number)
    assert delivered == list(range(1, 51))


def test_round_trip_from_an_echoed_stamp() -> None:
    sent = dg.stamp_us(5_000_000_000)
    assert dg.round_trip_us(dg.stamp_us(5_030_000_000), sent, 10_000) == 20_000
    wrapped = dg.STAMP_MASK - 5
    assert dg.round_trip_us(100, wrapped, 0) == 106
    assert dg.round_trip_us(100, 0, 0) is None


@given(st.binary(max_size=200))
def test_garbage_never_opens(blob: bytes) -> None:
    _, server = pair()
    assert server.open(b"BD" + SID + blob) is None
    assert dg.decode_plain(blob, with_address=True) is None or isinstance(
        dg.decode_plain(blob, with_address=True), dg.Packet
    )


def test_a_grant_packs_and_unpacks() -> None:
    sid, key = dg.new_grant()
    assert dg.unpack_grant(dg.pack_grant(sid, key)) == (sid, key)
    assert dg.unpack_grant(b"short") is None


def test_a_close_names_its_flow_only() -> None:
    client, server = pair()
    _, packet = server.open(client.seal(dg.Packet(dg.Kind.CLOSE, dg.TUNNEL_LINK, flow=9)))
    assert (packet.kind, packet.flow, packet.address, packet.payload) == (
        dg.Kind.CLOSE,
        9,
        None,
        b"",
    )
