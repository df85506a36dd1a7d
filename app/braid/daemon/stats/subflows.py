"""How many TCP subflows leave from each local address to the server.

MPTCP subflows are ordinary TCP sockets in the kernel's tables, so the
namespace's /proc/net/tcp and tcp6 list them; reading those once a second is
far cheaper than asking every connection for MPTCP_FULL_INFO.
"""

from __future__ import annotations

import collections
import ipaddress
import socket
import struct
from pathlib import Path

ESTABLISHED = "01"


def _address(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # /proc prints IPv6 as four host-order 32-bit words.
    words = struct.unpack("<4I", raw)
    return str(ipaddress.IPv6Address(struct.pack(">4I", *words)))


def count_subflows(server_port: int, proc_net: Path = Path("/proc/net")) -> dict[str, int]:
    """Established TCP connections to ``server_port``, counted by local address."""
    counts: collections.Counter[str] = collections.Counter()
    for name in ("tcp", "tcp6"):
        try:
            lines = (proc_net / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != ESTABLISHED:
                continue
            local, remote = fields[1], fields[2]
            remote_port = int(remote.rsplit(":", 1)[1], 16)
            if remote_port != server_port:
                continue
            address = _address(local.rsplit(":", 1)[0])
            if address.startswith("::ffff:"):
                address = address.removeprefix("::ffff:")
            counts[address] += 1
    return dict(counts)
