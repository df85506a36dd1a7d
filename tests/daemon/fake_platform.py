"""A recording stand-in for braidd's platform, pool and prober: the reconciler without root.

The fake keeps a little kernel of its own (devices with addresses, applied routing, withdrawn
endpoints, the capture plan) and records every call, so tests can say what was applied in
which order. Its pool and prober are driven by the test: ``pool.connect()``, ``prober.say()``.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from typing import Any

from braid.daemon.links.health import LinkHealth
from braid.daemon.routing.policy import DeviceView, LinkRouting
from braid.daemon.tunnel.spread import Spreading


class FakePaths:
    active = False


class FakePlatform:
    def __init__(self) -> None:
        self.devices: dict[str, DeviceView] = {}
        self.kinds: dict[str, tuple[str, bool | None]] = {}
        #: NetworkManager's connectivity per device, as the test sets it.
        self.connectivity_of: dict[str, str] = {}
        self.routing: dict[str, LinkRouting] = {}
        self.withdrawn: set[str] = set()
        self.plan: Any = None
        #: Headroom for calls: each device's limit (bytes per second), and the ones held to it.
        self.limits: dict[str, int] = {}
        self.gated: set[str] = set()
        #: Tables a test removed "from outside" (an nft flush ruleset).
        self.flushed: set[str] = set()
        self.calls: list[tuple] = []
        self.paths = FakePaths()
        self.resolved: dict[str, list[str]] = {}
        self.io: dict[str, tuple[int, int]] = {}
        #: Set to make the next apply wait until the test releases it (a slow netlink call).
        self.apply_gate: asyncio.Event | None = None

    def device(
        self,
        name: str,
        index: int,
        v4: str | None = None,
        v6: str | None = None,
        up: bool = True,
        gateway4: str | None = None,
    ) -> None:
        self.devices[name] = DeviceView(
            name=name,
            ifindex=index,
            up=up,
            carrier=up,
            addresses4=[(v4, 24)] if v4 else [],
            addresses6=[(v6, 64)] if v6 else [],
            gateway4=gateway4,
        )

    async def start(self) -> None:
        self.calls.append(("start",))

    async def stop(self) -> None:
        self.calls.append(("stop",))
        self.routing.clear()
        self.plan = None

    async def headroom(self, before, limits, gated, servers, port) -> None:
        self.calls.append(("headroom", before, dict(limits), set(gated), list(servers), port))
        self.limits, self.gated = dict(limits), set(gated)
        self.flushed.discard("inet braid_headroom")

    async def nft_tables(self) -> set[str] | None:
        """The tables braidd's state implies, less those removed from outside (``flushed``: a
        firewall reload), which writing them again puts back."""
        tables = set()
        if self.plan is not None:
            tables.add("inet braid")
        if self.limits:
            tables.add("inet braid_headroom")
        return tables - self.flushed

    async def views(self, names: list[str]) -> dict[str, DeviceView | None]:
        return {name: self.devices.get(name) for name in names}

    async def discover(self) -> dict[str, tuple[str, bool | None]]:
        return {n: k for n, k in self.kinds.items() if n in self.devices}

    async def connectivity(self) -> dict[str, str]:
        return dict(self.connectivity_of)

    async def interfaces(self) -> list:
        from braid.daemon.links.classify import Classification

        return [
            Classification(
                name=name,
                kind=self.kinds.get(name, ("other", None))[0],
                is_link=name in self.kinds,
                metered=None,
                reason="a test device",
                driver=None,
                devtype=None,
            )
            for name in self.devices
        ]

    async def apply(self, routing: dict[str, LinkRouting | None], withdrawn: set[str]) -> None:
        if self.apply_gate is not None:
            await self.apply_gate.wait()
        for name in set(self.routing) - set(routing):
            self.calls.append(("remove", name))
            del self.routing[name]
        for name, want in routing.items():
            if want is None:
                if self.routing.pop(name, None) is not None:
                    self.calls.append(("remove", name))
                self.withdrawn.discard(name)
                continue
            if self.routing.get(name) != want:
                self.calls.append(("apply", name))
                self.routing[name] = want
            if name in withdrawn and name not in self.withdrawn:
                self.calls.append(("withdraw", name))
                self.withdrawn.add(name)
            elif name not in withdrawn and name in self.withdrawn:
                self.calls.append(("reinstate", name))
                self.withdrawn.discard(name)

    def applied(self) -> dict[str, LinkRouting]:
        return dict(self.routing)

    async def capture(self, plan) -> None:
        self.calls.append(("capture", plan is not None))
        self.plan = plan
        self.flushed.discard("inet braid")

    async def resolve(self, host: str, port: int) -> list[str]:
        self.calls.append(("resolve", host))
        if host not in self.resolved:
            raise OSError(f"no address for {host}")
        return list(self.resolved[host])

    async def counters(self) -> dict[str, tuple[int, int]]:
        return dict(self.io)

    async def in_netlink(self, fn, *args):
        return fn(*args)


@dataclass
class FakePool:
    pairing: Any
    source: Any
    size: int
    on_change: Any
    addresses: list[str]
    mark: int | None
    connected: bool = False
    fatal_error: str | None = None
    last_error: str | None = None
    started: bool = False
    stopped: bool = False
    refreshed: int = 0
    ready_count: int = 0

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    def refresh(self) -> None:
        self.refreshed += 1

    def resize(self, size: int) -> None:
        self.size = size

    def connect(self) -> None:
        self.connected, self.last_error = True, None
        self.on_change()

    def lose(self, error: str = "timed out") -> None:
        self.connected, self.last_error = False, error
        self.on_change()

    def refuse(self, error: str = "wrong token") -> None:
        self.connected, self.fatal_error, self.last_error = False, error, error
        self.on_change()


@dataclass
class FakeProber:
    key: bytes
    server: tuple[str, int]
    on_change: Any
    interval: float
    mark: int | None
    links: dict[str, str] = field(default_factory=dict)
    running: bool = False
    stopped: bool = False
    rtt_ms: dict[str, float] = field(default_factory=dict)  # as the test sets it; else 10 ms

    async def start(self) -> None:
        self.running = True

    async def stop(self) -> None:
        self.running, self.stopped = False, True

    def set_link(self, name: str, device: str, source: str) -> None:
        self.links[name] = source

    def remove_link(self, name: str) -> None:
        self.links.pop(name, None)

    def health(self, name: str) -> LinkHealth:
        return LinkHealth(rtt_ms=self.rtt_ms.get(name, 10.0), jitter_ms=1.0, loss=0.0)

    def say(self, name: str, alive: bool) -> None:
        self.on_change(name, alive)


class Made:
    """Keeps every pool and prober the reconciler made, for the tests to drive."""

    def __init__(self) -> None:
        self.pools: list[FakePool] = []
        self.probers: list[FakeProber] = []

    def pool(self, pairing, source, size, on_change, addresses, mark) -> FakePool:
        pool = FakePool(pairing, source, size, on_change, addresses, mark)
        self.pools.append(pool)
        return pool

    def prober(self, key, server, on_change, interval, mark) -> FakeProber:
        prober = FakeProber(key, server, on_change, interval, mark)
        self.probers.append(prober)
        return prober


def spreading(platform: FakePlatform, links) -> Spreading:
    return Spreading(platform.paths, links, platform.in_netlink)  # inactive: paths not managed


__all__ = ["FakePlatform", "FakePool", "FakeProber", "Made", "socket", "spreading"]
