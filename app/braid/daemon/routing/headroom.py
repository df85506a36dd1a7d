"""Headroom for calls: the tunnels' downloads held under the rate of the link a call uses.

A download through Braid fills every link, and the server's congestion control (BBR, the
default) keeps a standing queue in each ISP's buffer: measured in the test world, 18 ms in the
20 Mbit/s link's 40 ms buffer, without a drop. A call on that link waits behind it, whatever
path its datagrams take. Real access links buffer far more (hundreds of milliseconds on a
bufferbloated cable or 4G line).

While a real-time flow uses a link where a queue builds, braidd drops the tunnels' TCP arriving
on that link above a share of the link's rate (``call_headroom`` percent under it): the sender
sees the loss and settles under the link's rate, the ISP's queue drains, and the call crosses
an empty buffer. This is ingress shaping as SQM does it, with an nftables ``limit`` in a table
of Braid's own (this kernel has no ``act_police``, ifb or cake), matching only the server's
address and port: the datagram path, the probes and connections that do not go through Braid
are untouched; every tunnel on that link, interactive ones included, shares the held rate.

The limit counts packets of at least ``DATA_LENGTH`` bytes (the download's data, not the ACKs
of an upload), at the link's rate over ``FULL_PACKET``: an nft *byte* limit's bucket holds a
second of its rate, so after a lull a sender probing upwards (BBR does, every few seconds)
filled the queue again for seconds before its first drop (measured: a call's p99 35 ms held by
bytes, 28 ms by packets), while a packet limit's bucket is ``BURST_PACKETS``. A link whose
interface merges received packets (GRO or LRO: most real NICs and Wi-Fi) shows netfilter one
packet for many, so there the limit counts bytes, with the weaker bucket: right in bytes, if
slower to bite. Each link has one limit (a chain of its own that both address families go to),
counting all the time while braidd is connected; a call only adds the link to the set ``calls``
the limit's rule also matches. A limit is rewritten only when its link's rate moves by more
than a tenth, and then only that link's chain.
"""

from __future__ import annotations

import array
import fcntl
import ipaddress
import logging
import re
import socket
import struct

from braid.daemon.routing.capture import run_nft

log = logging.getLogger(__name__)

TABLE = "braid_headroom"
FULL_PACKET = 1500
DATA_LENGTH = 1000  # a packet at least this long (IP length) counts as data
BURST_PACKETS = 10
BURST_KBYTES = 64  # for links that merge packets (a byte limit)
#: Interface names nft may be given quoted (the kernel allows almost anything else).
_DEVICE = re.compile(r"^[A-Za-z0-9_.@+-]{1,15}$")
SIOCETHTOOL = 0x8946
ETHTOOL_GFLAGS = 0x25
ETHTOOL_GGRO = 0x2B
ETH_FLAG_LRO = 1 << 15


class HeadroomError(Exception):
    """nft is missing, hung, or refused the rules."""


def receive_offload(device: str) -> bool:
    """Does ``device`` merge received packets (GRO or LRO)? True when it cannot be told."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for command, mask in ((ETHTOOL_GGRO, 0xFFFFFFFF), (ETHTOOL_GFLAGS, ETH_FLAG_LRO)):
                value = array.array("I", [command, 0])
                request = struct.pack("16sP16x", device.encode()[:15], value.buffer_info()[0])
                fcntl.ioctl(sock, SIOCETHTOOL, request)
                if value[1] & mask:
                    return True
    except OSError:
        return True
    return False


def _chains(device: str) -> tuple[str, str]:
    """The chain a link's tunnel traffic goes to, and the one holding its limit."""
    name = device.encode().hex()
    return f"link_{name}", f"hold_{name}"


def _limit_rule(rate: int, merged: bool) -> str:
    if merged:
        limit = f"limit rate over {max(1, rate // 1024)} kbytes/second burst {BURST_KBYTES} kbytes"
    else:
        limit = (
            f"limit rate over {max(1, rate // FULL_PACKET)}/second burst {BURST_PACKETS} packets"
        )
    return f"meta length >= {DATA_LENGTH} {limit} iifname @calls counter drop"


def _to_limit(servers: list[str], port: int, hold: str) -> list[str]:
    out = []
    for server in servers:
        try:
            address = ipaddress.ip_address(server.split("%")[0])
        except ValueError:
            continue  # only addresses are matched (the pool's are resolved ones)
        family = "ip6" if address.version == 6 else "ip"
        out.append(f"{family} saddr {address} tcp sport {int(port)} goto {hold}")
    return out


def _names(gated: set[str]) -> str:
    """``"eth0", "wlan0"``: the quotable names of ``gated``, in order."""
    return ", ".join('"' + name + '"' for name in sorted(gated) if _DEVICE.match(name))


def script(
    before: dict[str, int] | None,
    limits: dict[str, int],
    gated: set[str],
    servers: list[str],
    port: int,
    merging: frozenset[str] | set[str] = frozenset(),
) -> str:
    """One nft transaction from the table as ``before`` left it (None: unknown) to a limit per
    link in ``limits`` (device -> bytes per second) on TCP from ``servers`` port ``port``,
    dropping over it only on the ``gated`` links (the set ``calls``); no limits remove the
    table. ``merging``: the links whose interface merges received packets (a byte limit)."""
    limits = {d: r for d, r in limits.items() if _DEVICE.match(d) and r > 0}
    if not limits:
        return f"table inet {TABLE}\ndelete table inet {TABLE}\n"
    names = _names(gated)
    if before is not None and set(before) == set(limits):
        lines = [f"flush set inet {TABLE} calls"]
        if names:
            lines.append(f"add element inet {TABLE} calls {{ {names} }}")
        for device, rate in sorted(limits.items()):
            if before[device] != rate:
                hold = _chains(device)[1]
                lines.append(f"flush chain inet {TABLE} {hold}")
                lines.append(f"add rule inet {TABLE} {hold} {_limit_rule(rate, device in merging)}")
        return "\n".join(lines) + "\n"
    lines = [
        f"table inet {TABLE}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        "  set calls {",
        "    type ifname",
        *([f"    elements = {{ {names} }}"] if names else []),
        "  }",
        "  chain hold {",
        "    type filter hook prerouting priority raw; policy accept;",
        *[f'    iifname "{device}" jump {_chains(device)[0]}' for device in sorted(limits)],
        "  }",
    ]
    for device, rate in sorted(limits.items()):
        link, hold = _chains(device)
        lines += [f"  chain {link} {{", *[f"    {r}" for r in _to_limit(servers, port, hold)]]
        lines += ["  }", f"  chain {hold} {{", f"    {_limit_rule(rate, device in merging)}", "  }"]
    return "\n".join([*lines, "}"]) + "\n"


def _nft(text: str) -> None:
    run_nft(text, HeadroomError, "headroom for calls")


def install(
    before: dict[str, int] | None,
    limits: dict[str, int],
    gated: set[str],
    servers: list[str],
    port: int,
) -> None:
    """Bring the headroom table from ``before`` to ``limits`` and ``gated`` (atomically)."""
    merging = {device for device in limits if receive_offload(device)}
    _nft(script(before, limits, gated, servers, port, merging))


def remove() -> None:
    """Remove the headroom table if it exists; nothing else is touched."""
    try:
        _nft(script(None, {}, set(), [], 0))
    except HeadroomError as exc:
        log.debug("no headroom table to remove: %s", exc)


__all__ = ["TABLE", "HeadroomError", "install", "receive_offload", "remove", "script"]
