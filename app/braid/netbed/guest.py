"""A namespace NATed behind the laptop, as a container on Docker's default bridge is (or a VM,
or a client of a hotspot shared from the laptop)::

    with nated_guest(world) as guest:
        guest.run(["curl", "http://198.19.0.1/"])

The laptop gets a veth ``vguest`` (198.18.200.1/24, 2001:db8:200::1/64), forwarding on and a
masquerade out of every other interface (an nftables table ``inet guest_nat``); the guest
(198.18.200.2, 2001:db8:200::2) routes everything through it. On leaving, the veth, the table,
the guest namespace and the laptop's forwarding sysctls are put back as they were. The guest's
name has the world's prefix, so :func:`braid.netbed.world.sweep_stale` removes it after a crash.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from braid.netbed import nsutil
from braid.netbed.world import World, child_env

GUEST4, GATEWAY4 = "198.18.200.2", "198.18.200.1"
GUEST6, GATEWAY6 = "2001:db8:200::2", "2001:db8:200::1"
FORWARDING = ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding")
TABLE = "guest_nat"


@dataclass
class Guest:
    name: str  # the namespace

    def run(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` in the guest; by default unchecked, with text output captured."""
        kw.setdefault("check", False)
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw["env"] = child_env(kw.get("env"))
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` in the guest; the caller stops it."""
        kw["env"] = child_env(kw.get("env"))
        return subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kw)


@contextlib.contextmanager
def nated_guest(world: World) -> Iterator[Guest]:
    laptop = world.ns("laptop")
    name = laptop.rsplit("-", 1)[0] + "-guest"
    before = {key: world.run("laptop", ["sysctl", "-n", key]).stdout.strip() for key in FORWARDING}
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        nsutil.ip_batch(
            laptop,
            [
                f"link add vguest type veth peer name eth0 netns {name}",
                f"address add {GATEWAY4}/24 dev vguest",
                f"address add {GATEWAY6}/64 dev vguest nodad",
                "link set vguest up",
            ],
        )
        nsutil.ip_batch(
            name,
            [
                "link set lo up",
                f"address add {GUEST4}/24 dev eth0",
                f"address add {GUEST6}/64 dev eth0 nodad",
                "link set eth0 up",
                f"route add default via {GATEWAY4}",
                f"route add default via {GATEWAY6}",
            ],
        )
        world.run("laptop", ["sysctl", "-q", *(f"{key}=1" for key in FORWARDING)])
        world.run(
            "laptop",
            ["nft", "-f", "-"],
            input=(
                f"table inet {TABLE} {{\n"
                "  chain postrouting {\n"
                "    type nat hook postrouting priority srcnat; policy accept;\n"
                f'    oifname != "vguest" ip saddr {GUEST4}/24 masquerade\n'
                f'    oifname != "vguest" ip6 saddr {GUEST6}/64 masquerade\n'
                "  }\n"
                "}\n"
            ),
        )
        yield Guest(name)
    finally:
        world.run("laptop", ["nft", "delete", "table", "inet", TABLE], check=False)
        world.run("laptop", ["sysctl", "-q", *(f"{k}={v}" for k, v in before.items())], check=False)
        world.run("laptop", ["ip", "link", "del", "vguest"], check=False)
        subprocess.run(["ip", "netns", "del", name], check=False)


__all__ = ["GATEWAY4", "GATEWAY6", "GUEST4", "GUEST6", "Guest", "nated_guest"]
