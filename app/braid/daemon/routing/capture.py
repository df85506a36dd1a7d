"""System-wide mode: an nftables table of Braid's own that sends the laptop's traffic to braidd.

- DNS (UDP and TCP port 53) is always captured, whatever the destination, so no query
  leaves a link in clear — even one for a resolver on the local network.
- Then whatever must go direct returns: braidd's own sockets (by mark), the server's
  addresses, loopback, link-local, multicast, each link's own subnet (printers, the
  router's page) and the user's bypass list.
- TCP is redirected (nat) to braidd's transparent listener, which reads the original
  destination with SO_ORIGINAL_DST. UDP is marked; a policy rule routes marked packets
  back in through loopback, where TPROXY hands them to braidd's transparent UDP socket
  with their original destination intact.
- With "prefer TCP for the web", UDP to port 443 (QUIC) is rejected, so browsers fall back
  to TCP, which MPTCP aggregates.

The table is Braid's by name (``inet braid``); removing it removes every rule at once.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import subprocess
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

TABLE = "braid"
OWN_MARK = 0x1B00_0001  # set with SO_MARK on braidd's own sockets: never captured
UDP_MARK = 0x1B00_0002  # captured UDP, on its way to TPROXY
ALWAYS_DIRECT4 = ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "255.255.255.255/32")
ALWAYS_DIRECT6 = ("::/128", "::1/128", "fe80::/10", "ff00::/8")


class CaptureError(RuntimeError):
    """nftables refused the ruleset; the message carries nft's own words."""


@dataclass
class CapturePlan:
    tcp_port: int
    udp_port: int
    server_addresses: list[str] = field(default_factory=list)
    link_subnets: list[str] = field(default_factory=list)
    bypass: list[str] = field(default_factory=list)
    reject_quic: bool = True

    def networks(self) -> tuple[list[str], list[str]]:
        v4, v6 = list(ALWAYS_DIRECT4), list(ALWAYS_DIRECT6)
        for text in [*self.server_addresses, *self.link_subnets, *self.bypass]:
            net = ipaddress.ip_network(text, strict=False)
            (v4 if net.version == 4 else v6).append(str(net))
        return _collapse(v4), _collapse(v6)


def _collapse(nets: list[str]) -> list[str]:
    # nft refuses overlapping intervals in a set: merge them first.
    return [str(n) for n in ipaddress.collapse_addresses(ipaddress.ip_network(x) for x in nets)]


def parse_bypass(entries: list[str]) -> list[str]:
    """Validate the user's bypass list (addresses or networks); raises ValueError with the culprit."""
    out = []
    for entry in entries:
        try:
            out.append(str(ipaddress.ip_network(entry.strip(), strict=False)))
        except ValueError:
            raise ValueError(
                f"{entry!r} is not an address or a network (e.g. 192.0.2.0/24)"
            ) from None
    return out


def ruleset(plan: CapturePlan) -> str:
    """The nft script that (re)creates Braid's table."""
    v4, v6 = plan.networks()
    own = f"meta mark {OWN_MARK:#x} return"
    direct = ["ip daddr @direct4 return", "ip6 daddr @direct6 return"]
    quic = (
        ["meta l4proto udp udp dport 443 reject with icmpx type port-unreachable"]
        if plan.reject_quic
        else []
    )
    lines = [
        f"table inet {TABLE} {{",
        "  set direct4 { type ipv4_addr; flags interval; elements = { " + ", ".join(v4) + " } }",
        "  set direct6 { type ipv6_addr; flags interval; elements = { " + ", ".join(v6) + " } }",
        "  chain nat_output {",
        "    type nat hook output priority -100; policy accept;",
        f"    {own}",
        "    fib daddr type local return",
        f"    tcp dport 53 redirect to :{plan.tcp_port}",
        *[f"    {rule}" for rule in direct],
        f"    meta l4proto tcp redirect to :{plan.tcp_port}",
        "  }",
        "  chain filter_output {",
        "    type filter hook output priority 0; policy accept;",
        f"    {own}",
        "    fib daddr type local return",
        "    udp dport 53 return",
        *[f"    {rule}" for rule in direct],
        *[f"    {rule}" for rule in quic],
        "  }",
        "  chain route_output {",
        "    type route hook output priority mangle; policy accept;",
        f"    {own}",
        "    fib daddr type local return",
        f"    udp dport 53 meta mark set {UDP_MARK:#x} return",
        *[f"    {rule}" for rule in direct],
        f"    meta l4proto udp meta mark set {UDP_MARK:#x}",
        "  }",
        "  chain tproxy_prerouting {",
        "    type filter hook prerouting priority mangle; policy accept;",
        f"    meta mark {UDP_MARK:#x} meta l4proto udp meta nfproto ipv4 "
        f"tproxy ip to 127.0.0.1:{plan.udp_port} accept",
        f"    meta mark {UDP_MARK:#x} meta l4proto udp meta nfproto ipv6 "
        f"tproxy ip6 to [::1]:{plan.udp_port} accept",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _nft(script: str) -> None:
    nft = shutil.which("nft")
    if nft is None:
        raise CaptureError("system-wide mode needs nftables (Debian: apt install nftables)")
    done = subprocess.run(
        [nft, "-f", "-"], input=script, text=True, capture_output=True, check=False
    )
    if done.returncode != 0:
        raise CaptureError(f"nftables refused Braid's rules: {done.stderr.strip()}")


def install(plan: CapturePlan) -> None:
    """Create or replace Braid's table atomically (one nft transaction)."""
    _nft(f"table inet {TABLE}\ndelete table inet {TABLE}\n" + ruleset(plan))
    log.info(
        "system-wide capture on: TCP → :%d, UDP → :%d%s",
        plan.tcp_port,
        plan.udp_port,
        ", QUIC refused" if plan.reject_quic else "",
    )


def remove() -> None:
    """Remove Braid's table if it exists; nothing else is touched."""
    # Declaring the table first makes the delete succeed whether or not it existed.
    _nft(f"table inet {TABLE}\ndelete table inet {TABLE}\n")


def present() -> bool:
    nft = shutil.which("nft")
    if nft is None:
        return False
    done = subprocess.run(
        [nft, "list", "table", "inet", TABLE], capture_output=True, text=True, check=False
    )
    return done.returncode == 0
