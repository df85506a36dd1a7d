"""Which UDP flows are real-time, and which links each datagram takes (pure)."""

from __future__ import annotations

from braid.daemon.tunnel.flowclass import (
    BULK,
    OTHER,
    REALTIME,
    FlowMeter,
    LinkView,
    choose_links,
    classify,
    is_stun,
)


def meter(pps: int, size: int, seconds: float = 1.0) -> tuple[FlowMeter, float]:
    m = FlowMeter()
    n = int(pps * seconds)
    for i in range(n):
        m.add(i / pps, size)
    return m, (n - 1) / pps


def test_a_call_is_real_time_by_its_shape() -> None:
    m, now = meter(50, 160)
    assert classify(40000, None, False, m, now) == REALTIME


def test_ports_dscp_and_the_users_list_make_a_flow_real_time() -> None:
    m, now = meter(1, 1200)
    assert classify(40000, None, False, m, now) == OTHER
    assert classify(3478, None, False, m, now) == REALTIME
    assert classify(40000, 46, False, m, now) == REALTIME  # EF
    assert classify(40000, 34, False, m, now) == REALTIME  # AF41
    assert classify(40000, 0, True, m, now) == REALTIME


def test_a_flow_that_turns_bulk_is_no_longer_real_time() -> None:
    m, now = meter(400, 1200)  # 3.8 Mbit/s
    assert classify(3478, 46, True, m, now, was=REALTIME) == BULK


def test_a_pause_in_speech_keeps_the_class() -> None:
    m, now = meter(2, 160)
    assert classify(40000, None, False, m, now, was=REALTIME) == REALTIME
    assert classify(40000, None, False, m, now, was=OTHER) == OTHER


LINKS = [
    LinkView("eth0", 0, 30.0, True),
    LinkView("wlan0", 1, 12.0, True),
    LinkView("usb0", 2, 8.0, True, backup=True),
    LinkView("dead", 3, 1.0, False),
]


def test_the_lowest_delay_wins_and_redundancy_takes_two() -> None:
    assert choose_links(LINKS, 1, 200) == ("wlan0",)
    assert choose_links(LINKS, 2, 200) == ("wlan0", "eth0")


def test_backup_links_only_when_nothing_else_works() -> None:
    only_backup = [LINKS[2], LINKS[3]]
    assert choose_links(only_backup, 2, 200) == ("usb0",)


def test_no_usable_link_means_the_tunnel() -> None:
    assert choose_links([LINKS[3]], 1, 200) == ()


def test_a_datagram_too_large_for_a_link_avoids_it() -> None:
    links = [LinkView("a", 0, 5.0, True, mtu=1280), LinkView("b", 1, 20.0, True, mtu=1500)]
    assert choose_links(links, 1, 1400) == ("b",)
    assert choose_links(links, 1, 1600) == ()


def test_the_best_link_changes_only_when_clearly_better() -> None:
    links = [LinkView("a", 0, 20.0, True), LinkView("b", 1, 19.0, True)]
    assert choose_links(links, 1, 100, previous=("a",)) == ("a",)
    links = [LinkView("a", 0, 40.0, True), LinkView("b", 1, 19.0, True)]
    assert choose_links(links, 1, 100, previous=("a",)) == ("b",)


def stun_binding_request(attributes: bytes = b"") -> bytes:
    """An RFC 5389 binding request as WebRTC sends in its connectivity checks."""
    return (
        (0x0001).to_bytes(2, "big")
        + len(attributes).to_bytes(2, "big")
        + b"\x21\x12\xa4\x42"
        + bytes(range(12))  # transaction id
        + attributes
    )


def test_stun_messages_are_told_from_other_datagrams() -> None:
    # USERNAME (0x0006), 8 bytes, as in an ICE check; then a bare binding request.
    assert is_stun(stun_binding_request((0x0006).to_bytes(2, "big") + b"\x00\x08" + b"abcd:efg"))
    assert is_stun(stun_binding_request())
    assert not is_stun(stun_binding_request()[:19])  # too short for a header
    assert not is_stun(stun_binding_request(b"\x00\x06\x00\x03abc"))  # not in 4-byte words
    assert not is_stun(stun_binding_request() + b"xxxx")  # the length is not the rest
    rtp = b"\x80\x60" + bytes(158)  # RTP: version 2 in the first two bits
    assert not is_stun(rtp)
    assert not is_stun(b"\x00\x01\x00\x00" + b"\x00" * 16)  # no magic cookie
