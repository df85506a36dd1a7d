"""braidd's DNS relay: the ids it sends to the server are random, never a counter."""

from __future__ import annotations

import itertools

import pytest

from braid.daemon.tunnel.transparent import DNS_IN_FLIGHT, DnsRelay
from braid.tunnel_client import TunnelError


def test_query_ids_are_random_and_unique_while_in_flight() -> None:
    relay = DnsRelay(take_tunnel=None)  # type: ignore[arg-type]
    ids = []
    for _ in range(1000):
        query_id = relay._allocate()
        relay._pending[query_id] = (0, None)  # type: ignore[assignment]
        ids.append(query_id)
    assert len(set(ids)) == 1000
    steps = {b - a for a, b in itertools.pairwise(ids)}
    assert len(steps) > 900  # a counter would step by 1 every time
    assert max(ids) - min(ids) > 60000  # spread over the whole id space


def test_too_many_queries_in_flight_is_an_error() -> None:
    relay = DnsRelay(take_tunnel=None)  # type: ignore[arg-type]
    for i in range(DNS_IN_FLIGHT):
        relay._pending[i] = (0, None)  # type: ignore[assignment]
    with pytest.raises(TunnelError, match="too many DNS queries"):
        relay._allocate()
