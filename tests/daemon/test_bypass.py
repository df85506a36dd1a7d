"""Bypass by domain, the parts that need no network: reading answers, matching names, nft's
commands, and a learner that never costs the application its answer."""

from __future__ import annotations

import asyncio
import struct

import pytest

from braid.daemon.tunnel import bypass
from braid.netbed.dns import answer, braid_zone, build_query

ZONE = braid_zone("198.19.0.1", "2001:db8:ff::1")


@pytest.mark.parametrize(
    ("qtype", "want"), [("A", ("198.19.0.1", 60)), ("AAAA", ("2001:db8:ff::1", 60))]
)
def test_reads_the_name_and_addresses_of_an_answer(qtype, want) -> None:
    response, _info = answer(ZONE, build_query("Files.Braid.Test", qtype))
    found = bypass.read_answer(response)
    assert found == bypass.Answer("files.braid.test", (want,))


def test_a_name_without_addresses_and_garbage_are_not_answers() -> None:
    response, _info = answer(ZONE, build_query("v6only.braid.test", "A"))
    assert bypass.read_answer(response) == bypass.Answer("v6only.braid.test", ())
    nx, _ = answer(ZONE, build_query("nothing.braid.test", "A"))
    assert bypass.read_answer(nx) is None  # NXDOMAIN: rcode set
    assert bypass.read_answer(build_query("files.braid.test")) is None  # a query, not an answer
    assert bypass.read_answer(b"\x00" * 5) is None
    loop = struct.pack("!HHHHHH", 1, 0x8180, 1, 1, 0, 0) + b"\xc0\x0c" + b"\x00\x01\x00\x01"
    assert bypass.read_answer(loop) is None  # a pointer to itself
    truncated, _ = answer(ZONE, build_query("files.braid.test", "A"))
    assert bypass.read_answer(truncated[:-3]) is None


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("netflix.com", True),
        ("www.NETFLIX.com.", True),
        ("a.b.netflix.com", True),
        ("notnetflix.com", False),
        ("netflix.com.evil.test", False),
        ("com", False),
    ],
)
def test_a_name_covers_its_subdomains_only(name, want) -> None:
    assert bypass.bypassed(name, ("netflix.com",)) is want


def test_elements_refresh_their_timeout_within_bounds() -> None:
    script = bypass.elements_script([("198.19.0.1", 0), ("2001:db8::1", 10**9)])
    assert "add element inet braid bypass4 { 198.19.0.1 timeout 30s }" in script
    assert "delete element inet braid bypass4 { 198.19.0.1 }" in script
    assert (
        f"add element inet braid bypass6 {{ 2001:db8::1 timeout {bypass.MAX_TIMEOUT}s }}" in script
    )


def test_learning_only_bypassed_names_while_capture_is_on() -> None:
    added: list[bypass.Answer] = []

    class Recording(bypass.NameBypass):
        async def _add(self, found: bypass.Answer) -> None:
            added.append(found)

    entries = ["braid.test", "192.0.2.0/24"]
    active = [True]
    learner = Recording(lambda: entries, lambda: active[0])
    response, _ = answer(ZONE, build_query("files.braid.test", "A"))
    asyncio.run(learner.learn(response))
    assert [a.name for a in added] == ["files.braid.test"]
    active[0] = False
    asyncio.run(learner.learn(response))
    entries = ["other.test"]
    active[0] = True
    asyncio.run(learner.learn(response))
    assert len(added) == 1


def test_a_failing_learner_never_raises() -> None:
    class Broken(bypass.NameBypass):
        async def _add(self, found: bypass.Answer) -> None:
            raise OSError("nft is gone")

    learner = Broken(lambda: ["braid.test"], lambda: True)
    response, _ = answer(ZONE, build_query("files.braid.test", "A"))
    asyncio.run(learner.learn(response))
    assert learner.failures == 1
