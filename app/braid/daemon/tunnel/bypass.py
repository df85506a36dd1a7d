"""Bypass by domain: the addresses of bypassed names go direct for as long as their answer lives.

braidd answers every DNS query of the laptop in system-wide mode (:class:`DnsRelay`), through
the tunnel. When the question is a bypassed name (``netflix.com`` covers ``www.netflix.com``),
the answer's A and AAAA addresses go into the ``bypass4``/``bypass6`` sets of Braid's nftables
table, with the answer's TTL as timeout, before the answer is handed to the application: its
connection to them then returns from every capture chain and leaves directly.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from braid.bypass import split_bypass
from braid.daemon.routing import capture

log = logging.getLogger(__name__)

TYPE_A = 1
TYPE_AAAA = 28
FLAG_QR = 0x8000
#: An application connects right after its answer: a TTL of 0 or 1 must not expire before it.
MIN_TIMEOUT = 30
MAX_TIMEOUT = 86400
NFT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Answer:
    """What a DNS answer says: the question's name and its addresses, each with its TTL."""

    name: str
    addresses: tuple[tuple[str, int], ...]


def _skip_name(msg: bytes, offset: int) -> int:
    """The offset after the (possibly compressed) name at ``offset``."""
    for _ in range(128):  # bounded: a name has at most 127 labels
        if offset >= len(msg):
            raise ValueError("name runs past the message")
        length = msg[offset]
        if length == 0:
            return offset + 1
        if length & 0xC0 == 0xC0:
            return offset + 2
        offset += 1 + length
    raise ValueError("name too long")


def _read_name(msg: bytes, offset: int) -> str:
    labels: list[str] = []
    for _ in range(128):
        if offset >= len(msg):
            raise ValueError("name runs past the message")
        length = msg[offset]
        if length == 0:
            return ".".join(labels).lower()
        if length & 0xC0 == 0xC0:
            if offset + 1 >= len(msg):
                raise ValueError("pointer runs past the message")
            offset = ((length & 0x3F) << 8) | msg[offset + 1]
            continue
        labels.append(msg[offset + 1 : offset + 1 + length].decode("ascii", "replace"))
        offset += 1 + length
    raise ValueError("name too long or a pointer loop")


def read_answer(msg: bytes) -> Answer | None:
    """The question's name and the A/AAAA addresses of a DNS response (None: not one, or no
    question). Every address record of the answer section counts: a CNAME chain's addresses
    belong to the name asked."""
    try:
        if len(msg) < 12:
            return None
        _ident, flags, qd, an, _ns, _ar = struct.unpack_from("!HHHHHH", msg)
        if not flags & FLAG_QR or qd != 1 or flags & 0x000F:
            return None
        name = _read_name(msg, 12)
        offset = _skip_name(msg, 12) + 4
        found: list[tuple[str, int]] = []
        for _ in range(min(an, 512)):
            offset = _skip_name(msg, offset)
            rtype, _rclass, ttl, length = struct.unpack_from("!HHIH", msg, offset)
            offset += 10
            rdata = msg[offset : offset + length]
            offset += length
            if rtype == TYPE_A and length == 4:
                found.append((str(ipaddress.IPv4Address(rdata)), ttl))
            elif rtype == TYPE_AAAA and length == 16:
                found.append((str(ipaddress.IPv6Address(rdata)), ttl))
        return Answer(name, tuple(found))
    except (ValueError, struct.error):
        return None


def bypassed(name: str, names: Iterable[str]) -> bool:
    """``name`` is one of ``names`` or below one of them."""
    name = name.lower().removesuffix(".")
    return any(name == domain or name.endswith("." + domain) for domain in names)


def elements_script(addresses: Iterable[tuple[str, int]]) -> str:
    """nft commands putting each address into its bypass set with a fresh timeout.

    An element already there keeps its old timeout on ``add``: it is added (a no-op if present),
    deleted and added again in the same transaction, so the newest answer's TTL wins.
    """
    lines = []
    for address, ttl in addresses:
        version = ipaddress.ip_address(address).version
        target = f"inet {capture.TABLE} {capture.BYPASS_SETS[version]}"
        timeout = min(max(int(ttl), MIN_TIMEOUT), MAX_TIMEOUT)
        lines += [
            f"add element {target} {{ {address} }}",
            f"delete element {target} {{ {address} }}",
            f"add element {target} {{ {address} timeout {timeout}s }}",
        ]
    return "\n".join(lines) + "\n"


class NameBypass:
    """Learns bypassed names' addresses from the DNS relay's answers (``learn``)."""

    def __init__(self, entries: Callable[[], list[str]], active: Callable[[], bool]) -> None:
        self._entries = entries  # the user's bypass list, as set now
        self._active = active  # Braid's table is in place
        self._parsed: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
        self.learned = 0
        self.failures = 0

    def names(self) -> tuple[str, ...]:
        entries = tuple(self._entries())
        if entries != self._parsed[0]:
            try:
                self._parsed = (entries, split_bypass(list(entries)).names)
            except ValueError as exc:  # the settings are checked when set: a file edited by hand
                log.warning("bypass list ignored: %s", exc)
                self._parsed = (entries, ())
        return self._parsed[1]

    async def learn(self, answer: bytes) -> None:
        """Called with every answer before it goes to the application; never raises."""
        try:
            names = self.names()
            if not names or not self._active():
                return
            found = read_answer(answer)
            if found is None or not found.addresses or not bypassed(found.name, names):
                return
            await self._add(found)
        except Exception:  # a bypass that fails must not cost the application its answer
            self.failures += 1
            log.exception("bypass by name failed")

    async def _add(self, found: Answer) -> None:
        proc = await asyncio.create_subprocess_exec(
            "nft",
            "-f",
            "-",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _out, err = await asyncio.wait_for(
                proc.communicate(elements_script(found.addresses).encode()), NFT_TIMEOUT
            )
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            self.failures += 1
            log.warning("bypass of %s not applied: %s", found.name, err.decode().strip())
            return
        self.learned += len(found.addresses)
        log.debug(
            "bypass: %s → %s direct",
            found.name,
            ", ".join(address for address, _ in found.addresses),
        )
