"""System-wide mode: an nftables table of Braid's own that sends the laptop's traffic to braidd.

Every IP packet that would leave a link is the tunnel's own, an exempt one, or carried by braidd;
nothing else gets out, connected or blocked:

- DNS (UDP and TCP port 53) is always captured, whatever the destination, so no query
  leaves a link in clear — even one for a resolver on the local network.
- Then whatever must go direct returns: braidd's own sockets (by mark), the server's
  addresses, loopback, link-local, multicast, each link's own subnet (printers, the
  router's page, path-MTU and other ICMP to them), the user's bypass list (networks, and
  the addresses of bypassed names that braidd's DNS relay puts into ``bypass4``/``bypass6``
  with their TTL) and neighbour discovery.
- TCP is redirected (nat) to braidd's transparent listener, which reads the original
  destination with SO_ORIGINAL_DST. UDP is marked; a policy rule routes marked packets
  back in through loopback, where TPROXY hands them to braidd's transparent UDP socket
  with their original destination intact.
- Every other protocol (ICMP echo, GRE, SCTP, ESP ...) is rejected with admin-prohibited,
  so ``ping`` says "filtered" at once instead of waiting. Answers to connections that came
  in from outside (a ping of the laptop, a reset) are replies and pass.
- Forwarded traffic (containers, VMs, a hotspot shared from the laptop) whose route leads
  out of a link is caught in prerouting: TCP and UDP go to the same transparent listeners
  through TPROXY (DNS included, answered through the tunnel); other protocols are rejected
  in the forward hook. Traffic between the laptop's own virtual networks is not touched.
- With "prefer TCP for the web", UDP to port 443 (QUIC) is rejected, so browsers fall back
  to TCP, which MPTCP aggregates.

The table is Braid's by name (``inet braid``); removing it removes every rule at once. It is
updated in one transaction that keeps the dynamic bypass sets (their entries live for a DNS
TTL and would be lost by recreating the table).
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import subprocess
from dataclasses import dataclass, field

from braid.bypass import split_bypass
from braid.daemon.routing.apps import GroupRef

log = logging.getLogger(__name__)

TABLE = "braid"
OWN_MARK = 0x1B00_0001  # set with SO_MARK on braidd's own sockets: never captured
UDP_MARK = 0x1B00_0002  # captured UDP, and forwarded TCP/UDP, on their way to TPROXY
ALWAYS_DIRECT4 = ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "255.255.255.255/32")
ALWAYS_DIRECT6 = ("::/128", "::1/128", "fe80::/10", "ff00::/8")
#: ICMPv6 a link needs to work at all (RFC 4861): never captured.
NEIGHBOUR_DISCOVERY = (
    "nd-router-solicit",
    "nd-router-advert",
    "nd-neighbor-solicit",
    "nd-neighbor-advert",
    "nd-redirect",
)
#: The dynamic sets of bypassed names' addresses, filled by the DNS relay.
BYPASS_SETS = {4: "bypass4", 6: "bypass6"}
_CHAINS = {
    "nat_output": "type nat hook output priority -100; policy accept;",
    "filter_output": "type filter hook output priority 0; policy accept;",
    "route_output": "type route hook output priority mangle; policy accept;",
    "tproxy_prerouting": "type filter hook prerouting priority mangle; policy accept;",
    "filter_forward": "type filter hook forward priority 0; policy accept;",
}


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
    #: The links' interfaces: forwarded traffic routed out of one of them is captured.
    link_devices: list[str] = field(default_factory=list)
    #: "all": system-wide mode; "bonded": proxy mode, only the bonded group's TCP is redirected.
    scope: str = "all"
    #: Programs started with ``braid direct`` (system-wide mode) or ``braid bonded`` (proxy mode).
    direct_apps: GroupRef | None = None
    bonded_apps: GroupRef | None = None

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
    """The networks of the user's bypass list (names are checked too); raises ValueError."""
    return list(split_bypass(entries).networks)


def _set(items: list[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def _tproxy(proto: str, port: int, match: str = "") -> list[str]:
    """Hand a forwarded ``proto`` packet to braidd's transparent socket on ``port``."""
    head = f"meta l4proto {proto} {match}".rstrip()
    return [
        f"meta nfproto ipv4 {head} meta mark set {UDP_MARK:#x} tproxy ip to 127.0.0.1:{port} accept",
        f"meta nfproto ipv6 {head} meta mark set {UDP_MARK:#x} tproxy ip6 to [::1]:{port} accept",
    ]


def _group(ref: GroupRef) -> str:
    return f'socket cgroupv2 level {ref.level} "{ref.path}"'


def chains(plan: CapturePlan) -> dict[str, list[str]]:
    """The rules of each of Braid's chains, in order."""
    own = f"meta mark {OWN_MARK:#x} return"
    if plan.scope == "bonded":
        return _bonded_chains(plan, own)
    # A direct program's traffic returns first, DNS included: it asks its own resolver.
    owned = [own] + ([f"{_group(plan.direct_apps)} return"] if plan.direct_apps else [])
    links = _set([f'"{d}"' for d in plan.link_devices]) if plan.link_devices else ""
    # Routed to the laptop's own virtual networks (containers, VMs, a VPN's tun): not leaving
    # by a link, so not Braid's to carry. The route is chosen before the output hooks.
    owned += [f"oifname != {links} return"] if links else []
    direct = [
        "ip daddr @direct4 return",
        "ip6 daddr @direct6 return",
        f"ip daddr @{BYPASS_SETS[4]} return",
        f"ip6 daddr @{BYPASS_SETS[6]} return",
    ]
    quic = (
        ["meta l4proto udp udp dport 443 reject with icmpx type port-unreachable"]
        if plan.reject_quic
        else []
    )
    nd = f"icmpv6 type {_set(list(NEIGHBOUR_DISCOVERY))} return"
    refuse = "reject with icmpx type admin-prohibited"
    forwarded: list[str] = []
    forward: list[str] = ["ct direction reply return"]
    if links:
        forwarded = [
            'iifname "lo" return',
            f"iifname {links} return",  # arriving from a link: not the laptop's to carry
            "ct direction reply return",
            "fib daddr type { local, broadcast, multicast } return",
            f"fib daddr oifname != {links} return",  # between the laptop's own networks
            *_tproxy("tcp", plan.tcp_port, "th dport 53"),
            *_tproxy("udp", plan.udp_port, "th dport 53"),
            *direct,
            *quic,
            *_tproxy("tcp", plan.tcp_port),
            *_tproxy("udp", plan.udp_port),
        ]
        forward = [
            "ct direction reply return",
            f"iifname {links} return",
            f"oifname != {links} return",
            *direct,
            refuse,
        ]
    return {
        "nat_output": [
            *owned,
            "fib daddr type local return",
            f"tcp dport 53 redirect to :{plan.tcp_port}",
            *direct,
            f"meta l4proto tcp redirect to :{plan.tcp_port}",
        ],
        "filter_output": [
            *owned,
            "fib daddr type local return",
            "udp dport 53 return",
            *direct,
            *quic,
            nd,
            # TCP was redirected and UDP marked above; what is left of them belongs to
            # connections opened before capture began.
            "meta l4proto { tcp, udp } return",
            "ct direction reply return",  # answers to connections from outside: a ping of us
            refuse,
        ],
        "route_output": [
            *owned,
            "fib daddr type local return",
            f"udp dport 53 meta mark set {UDP_MARK:#x} return",
            *direct,
            f"meta l4proto udp meta mark set {UDP_MARK:#x}",
        ],
        "tproxy_prerouting": [
            f"meta mark {UDP_MARK:#x} meta l4proto udp meta nfproto ipv4 "
            f"tproxy ip to 127.0.0.1:{plan.udp_port} accept",
            f"meta mark {UDP_MARK:#x} meta l4proto udp meta nfproto ipv6 "
            f"tproxy ip6 to [::1]:{plan.udp_port} accept",
            *forwarded,
        ],
        "filter_forward": forward,
    }


def _bonded_chains(plan: CapturePlan, own: str) -> dict[str, list[str]]:
    """Proxy mode: the bonded group's TCP goes to braidd, everything else is left alone."""
    empty: dict[str, list[str]] = {name: [] for name in _CHAINS}
    if plan.bonded_apps is None:
        return empty
    return {
        **empty,
        "nat_output": [
            own,
            "fib daddr type local return",
            "ip daddr @direct4 return",
            "ip6 daddr @direct6 return",
            # A positive match only: for a socket of a shallower cgroup there is no ancestor at
            # that level, and a negated match would not match either.
            f"{_group(plan.bonded_apps)} meta l4proto tcp redirect to :{plan.tcp_port}",
        ],
    }


def rule_count(plan: CapturePlan) -> int:
    return sum(len(rules) for rules in chains(plan).values())


def ruleset(plan: CapturePlan) -> str:
    """The nft script that brings Braid's table to ``plan`` in one transaction.

    The table, its sets and chains are declared (a no-op where they exist), the chains and the
    static sets are emptied and filled again; the bypass sets keep their entries.
    """
    v4, v6 = plan.networks()
    declare = [
        f"table inet {TABLE} {{",
        "  set direct4 { type ipv4_addr; flags interval; }",
        "  set direct6 { type ipv6_addr; flags interval; }",
        f"  set {BYPASS_SETS[4]} {{ type ipv4_addr; flags timeout; }}",
        f"  set {BYPASS_SETS[6]} {{ type ipv6_addr; flags timeout; }}",
        *[f"  chain {name} {{ {hook} }}" for name, hook in _CHAINS.items()],
        "}",
    ]
    flush = [f"flush chain inet {TABLE} {name}" for name in _CHAINS]
    flush += [f"flush set inet {TABLE} direct4", f"flush set inet {TABLE} direct6"]
    fill = [
        f"table inet {TABLE} {{",
        f"  set direct4 {{ type ipv4_addr; flags interval; elements = {_set(v4)} }}",
        f"  set direct6 {{ type ipv6_addr; flags interval; elements = {_set(v6)} }}",
    ]
    for name, rules in chains(plan).items():
        fill += [f"  chain {name} {{", *[f"    {rule}" for rule in rules], "  }"]
    fill.append("}")
    return "\n".join([*declare, *flush, *fill]) + "\n"


#: How long one nft transaction may take before braidd gives up on it (a hung nft).
NFT_TIMEOUT = 10.0
#: How long listing the tables may take (it runs every few seconds on the netlink thread).
LIST_TIMEOUT = 2.0


def _nft(
    args: list[str], timeout: float, script: str | None = None
) -> subprocess.CompletedProcess[str] | None:
    """nft with ``args`` (``script`` on its input); None if this system has no nft. Raises
    OSError or subprocess.TimeoutExpired."""
    nft = shutil.which("nft")
    if nft is None:
        return None
    return subprocess.run(
        [nft, *args], input=script, text=True, capture_output=True, check=False, timeout=timeout
    )


def run_nft(
    script: str, error: type[Exception] = CaptureError, needed_by: str = "system-wide mode"
) -> None:
    """Run one nft transaction; ``error`` (with what needs nft) says why it did not take."""
    try:
        done = _nft(["-f", "-"], NFT_TIMEOUT, script)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise error(f"nftables did not take Braid's rules: {exc}") from exc
    if done is None:
        raise error(f"{needed_by} needs nftables (Debian: apt install nftables)")
    if done.returncode != 0:
        raise error(f"nftables refused Braid's rules: {done.stderr.strip()}")


def install(plan: CapturePlan) -> None:
    """Create Braid's table or bring it to ``plan``, atomically (one nft transaction)."""
    run_nft(ruleset(plan))
    if plan.scope == "bonded":
        log.info("programs started with braid bonded: TCP → :%d", plan.tcp_port)
        return
    log.info(
        "system-wide capture on: TCP → :%d, UDP → :%d%s",
        plan.tcp_port,
        plan.udp_port,
        ", QUIC refused" if plan.reject_quic else "",
    )


def remove() -> None:
    """Remove Braid's table if it exists; nothing else is touched."""
    # Declaring the table first makes the delete succeed whether or not it existed.
    run_nft(f"table inet {TABLE}\ndelete table inet {TABLE}\n")


def list_tables() -> set[str] | None:
    """The nftables tables present, as "FAMILY NAME" ("inet braid"); None if nft cannot say."""
    try:
        done = _nft(["list", "tables"], LIST_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done is None or done.returncode != 0:
        return None
    return {
        " ".join(line.split()[1:3])
        for line in done.stdout.splitlines()
        if line.startswith("table ")
    }
