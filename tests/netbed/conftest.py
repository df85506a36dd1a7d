"""Fixtures for the namespace test world's own tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from braid.netbed import LinkSpec, World, unavailable_reason

#: Shared by most tests; each test that changes a link restores it.
#: eth0 is fast for plain reachability, wlan0 is the shaping subject, usb0 the delay subject.
TEST_LINKS = [
    LinkSpec("eth0", "ethernet", rate_mbit=50, rtt_ms=0),
    LinkSpec("wlan0", "wifi", rate_mbit=20, rtt_ms=0),
    LinkSpec("usb0", "cellular", rate_mbit=30, rtt_ms=40),
]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with World(TEST_LINKS) as w:
        yield w
