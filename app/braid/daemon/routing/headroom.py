"""Headroom for calls: the tunnels' downloads held under the rate of the link a call uses.

A download through Braid fills every link, and the server's congestion control (BBR, the
default) keeps a standing queue in each ISP's buffer: measured in the test world, 18 ms in the
20 Mbit/s link's 40 ms buffer, without a drop. A call on that link waits behind it, whatever
path its datagrams take. Real access links buffer far more (hundreds of milliseconds on a
bufferbloated cable or 4G line).

While a real-time flow uses a link, braidd drops the tunnels' TCP arriving on that link above a
share of the fastest rate the link has shown (``call_headroom`` percent under it): the sender
sees the loss and settles under the link's rate, the ISP's queue drains, and the call crosses
an empty buffer. This is ingress shaping as SQM does it, with an nftables ``limit`` in a table
of Braid's own (this kernel has no ``act_police``, ifb or cake), matching only the server's
address and port, so the datagram path, the probes and every other connection are untouched.

The limit counts packets of at least ``DATA_LENGTH`` bytes (the download's data, not the ACKs
of an upload), at the link's rate over ``FULL_PACKET``: an nft *byte* limit's bucket holds a
second of its rate, so after a lull a sender probing upwards (BBR does, every few seconds)
filled the queue again for seconds before its first drop (measured: a call's p99 35 ms held by
bytes, 28 ms by packets), while a packet limit's bucket is ``BURST_PACKETS``. While braidd is
connected every link with a known rate has its limit counting, in a chain of its own, and a
call only adds the link to the set ``calls`` the rule also matches; a limit is rewritten only
when its link's rate moves by more than a tenth, and then only that link's chain.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import shutil
import subprocess

log = logging.getLogger(__name__)

TABLE = "braid_headroom"
#: The limit counts full-sized packets (the download's data; not the ACKs of an upload): a
#: byte limit's bucket holds a second of its rate, so a sender probing up after a lull (BBR
#: does, every few seconds) could fill the provider's queue for seconds before a drop, while a
#: packet limit's bucket is ``BURST_PACKETS`` (measured: p99 of a call 35 ms with bytes).
FULL_PACKET = 1500
DATA_LENGTH = 1000  # a packet at least this long (IP length) counts as data
BURST_PACKETS = 10
#: Interface names nft may be given quoted (the kernel allows almost anything else).
_DEVICE = re.compile(r"^[A-Za-z0-9_.@+-]{1,15}$")


class HeadroomError(Exception):
    """nft is missing or refused the rules."""


#: Characters of interface names that nft chain names cannot hold, and what stands for them.
_SPELLED = {".": "_dot_", "@": "_at_", "+": "_plus_", "-": "_dash_"}


def _chain(device: str) -> str:
    return "link_" + "".join(_SPELLED.get(c, c) for c in device)


def _limit_rules(rate: int, servers: list[str], port: int) -> list[str]:
    packets = max(1, rate // FULL_PACKET)
    out = []
    for server in servers:
        family = "ip6" if ipaddress.ip_address(server).version == 6 else "ip"
        out.append(
            f"{family} saddr {server} tcp sport {int(port)} meta length >= {DATA_LENGTH} "
            f"limit rate over {packets}/second burst {BURST_PACKETS} packets "
            "iifname @calls counter drop"
        )
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
) -> str:
    """One nft transaction from the table as ``before`` left it (None: unknown) to a limit per
    link in ``limits`` (device -> bytes per second) on TCP from ``servers`` port ``port``,
    dropping over it only on the ``gated`` links (the set ``calls``); no limits remove the table.
    Each link's limit sits in a chain of its own, so changing one link's rate, or the gate,
    leaves every other limit as it was."""
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
                chain = _chain(device)
                lines.append(f"flush chain inet {TABLE} {chain}")
                lines += [
                    f"add rule inet {TABLE} {chain} {rule}"
                    for rule in _limit_rules(rate, servers, port)
                ]
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
        *[f'    iifname "{device}" jump {_chain(device)}' for device in sorted(limits)],
        "  }",
    ]
    for device, rate in sorted(limits.items()):
        rules = _limit_rules(rate, servers, port)
        lines += [f"  chain {_chain(device)} {{", *[f"    {rule}" for rule in rules], "  }"]
    return "\n".join([*lines, "}"]) + "\n"


def _nft(script: str) -> None:
    nft = shutil.which("nft")
    if nft is None:
        raise HeadroomError("headroom for calls needs nftables (Debian: apt install nftables)")
    done = subprocess.run(
        [nft, "-f", "-"], input=script, text=True, capture_output=True, check=False
    )
    if done.returncode != 0:
        raise HeadroomError(f"nftables refused the headroom rules: {done.stderr.strip()}")


def install(
    before: dict[str, int] | None,
    limits: dict[str, int],
    gated: set[str],
    servers: list[str],
    port: int,
) -> None:
    """Bring the headroom table from ``before`` to ``limits`` and ``gated`` (atomically)."""
    _nft(script(before, limits, gated, servers, port))


def remove() -> None:
    """Remove the headroom table if it exists; nothing else is touched."""
    try:
        _nft(script(None, {}, set(), [], 0))
    except HeadroomError as exc:
        log.debug("no headroom table to remove: %s", exc)


__all__ = ["TABLE", "HeadroomError", "install", "remove", "script"]
