"""Link health probes: the Prober against braid-server's responder, first on loopback in this
process, then in the namespace world (blackhole, link down, delay, loss)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from braid.daemon.links.health import (
    FAST_SILENCE,
    MAX_SILENCE,
    LinkHealth,
    Prober,
    read_rx_packets,
)
from braid.netbed import LinkSpec, World, unavailable_reason
from braid.netbed.stack import BraidStack
from braid.protocol import probe
from braid.protocol.pairing import parse_pairing
from braid.server.probe import ProbeResponder
from braid.server.state import hash_token

TOKEN = "t" * 43
KEY = probe.key_from_token(TOKEN)


# --- on loopback, in process -------------------------------------------------------------------


class Responder(ProbeResponder):
    """The server's responder, with a switch to go silent and an optional filter on seq."""

    def __init__(self) -> None:
        super().__init__(lambda: [hash_token(TOKEN)])
        self.silent = False
        self.drop: Callable[[int], bool] = lambda seq: False

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        request = probe.parse(KEY, data)
        if self.silent or request is None or self.drop(request.seq):
            return
        super().datagram_received(data, addr)


class Loopback:
    def __init__(self, host: str = "127.0.0.1", **prober_args: Any) -> None:
        self.host = host
        self.prober_args = prober_args
        self.events: list[tuple[float, str, bool]] = []
        self.responder = Responder()

    async def __aenter__(self) -> Loopback:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(
            lambda: self.responder, local_addr=(self.host, 0)
        )
        port = self.transport.get_extra_info("sockname")[1]
        self.prober = Prober(KEY, (self.host, port), self.record, **self.prober_args)
        await self.prober.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.prober.stop()
        self.transport.close()

    def record(self, name: str, alive: bool) -> None:
        self.events.append((time.monotonic(), name, alive))

    async def wait(self, name: str, alive: bool, timeout: float) -> float:
        """Seconds until ``name``'s verdict became ``alive`` (counting from now)."""
        began, seen = time.monotonic(), len(self.events)
        while time.monotonic() - began < timeout:
            for at, who, verdict in self.events[seen:]:
                if (who, verdict) == (name, alive):
                    return at - began
            await asyncio.sleep(0.01)
        raise AssertionError(f"{name} not {'alive' if alive else 'dead'} within {timeout} s")


def test_verdicts_follow_the_replies() -> None:
    async def scenario() -> None:
        async with Loopback() as net:
            net.prober.set_link("lo", "", "127.0.0.1")
            assert await net.wait("lo", True, 1.0) < 0.5
            health = net.prober.health("lo")
            assert health.alive and health.rtt_ms is not None and health.rtt_ms < 20
            net.responder.silent = True
            assert await net.wait("lo", False, 1.5) < MAX_SILENCE + 0.1
            net.responder.silent = False
            assert await net.wait("lo", True, 1.0) < 0.5
        assert [alive for _, _, alive in net.events] == [True, False, True]

    asyncio.run(scenario())


def test_a_silent_link_is_dead_in_half_a_second_through_urgent_probes() -> None:
    async def scenario() -> list[tuple[float, float]]:
        took = []
        async with Loopback() as net:
            net.prober.set_link("lo", "", "127.0.0.1")
            await net.wait("lo", True, 1.0)
            for _ in range(3):
                await asyncio.sleep(0.3)
                net.responder.silent = True
                after_silence = await net.wait("lo", False, 1.5)
                dead_at = net.events[-1][0]
                last_reply = net.prober.health("lo").last_reply
                assert last_reply is not None
                took.append((after_silence, dead_at - last_reply))
                net.responder.silent = False
                await net.wait("lo", True, 1.0)
        return took

    took = asyncio.run(scenario())
    # Never before FAST_SILENCE has passed since the last reply (which came up to a probe
    # interval before the responder fell silent), and within half a second of the silence.
    assert all(t < 0.55 and quiet >= FAST_SILENCE - 0.01 for t, quiet in took), took


class Held(Responder):
    """Holds every answer back while ``hold`` is set, and sends them all when it is cleared: a
    queue filling under a download, or a Wi-Fi scan. Nothing is lost."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = False
        self.held: list[tuple[bytes, tuple]] = []

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if self.hold:
            self.held.append((data, addr))
            return
        super().datagram_received(data, addr)

    def release(self) -> None:
        self.hold = False
        for data, addr in self.held:
            super().datagram_received(data, addr)
        self.held.clear()


def test_late_replies_on_a_link_whose_traffic_still_arrives_are_not_a_dead_link() -> None:
    """Replies held 0.5 s, three times; the link's interface keeps receiving meanwhile."""
    received = [0]

    def rx_packets(device: str) -> int:
        received[0] += 10  # the download's packets keep arriving
        return received[0]

    async def scenario() -> list[bool]:
        # The old silence limit far away, so only the urgent probes could call it dead.
        net = Loopback(rx_packets=rx_packets, dead_after=2.0)
        net.responder = Held()
        async with net:
            net.prober.set_link("lo", "lo", "127.0.0.1")
            await net.wait("lo", True, 1.0)
            for _ in range(3):
                await asyncio.sleep(0.3)
                net.responder.hold = True
                await asyncio.sleep(0.5)
                net.responder.release()
            await asyncio.sleep(0.3)
        return [alive for _, _, alive in net.events]

    assert asyncio.run(scenario()) == [True]


def test_with_nothing_arriving_the_urgent_probes_decide_fast() -> None:
    async def scenario() -> float:
        # The interface receives nothing; the old silence limit far away: the urgent probes
        # alone decide.
        net = Loopback(rx_packets=lambda device: 1000, dead_after=2.0)
        async with net:
            net.prober.set_link("lo", "lo", "127.0.0.1")
            await net.wait("lo", True, 1.0)
            await asyncio.sleep(0.3)
            net.responder.silent = True
            return await net.wait("lo", False, 1.5)

    took = asyncio.run(scenario())
    assert FAST_SILENCE - 0.05 <= took < 0.55, took


def test_rx_packets_come_from_proc_net_dev(tmp_path) -> None:
    dev = tmp_path / "dev"
    dev.write_text(
        "Inter-|   Receive                    |  Transmit\n"
        " face |bytes    packets errs drop|bytes    packets\n"
        "    lo: 1234      17    0    0     1234      17\n"
        "  eth0: 99999    321    0    0     5555      40\n"
    )
    assert read_rx_packets("eth0", str(dev)) == 321
    assert read_rx_packets("lo", str(dev)) == 17
    assert read_rx_packets("wlan0", str(dev)) is None
    assert read_rx_packets("eth0", str(tmp_path / "missing")) is None


def test_isolated_lost_probes_do_not_make_a_link_dead() -> None:
    async def scenario() -> tuple[list, LinkHealth]:
        async with Loopback() as net:
            net.responder.drop = lambda seq: seq % 3 == 0  # a third of the probes, never two
            net.prober.set_link("lo", "", "127.0.0.1")
            await asyncio.sleep(4.0)
            return [alive for _, _, alive in net.events], net.prober.health("lo")

    verdicts, health = asyncio.run(scenario())
    assert verdicts == [True], verdicts
    assert health.loss > 0.1  # urgent probes are answered, regular ones still count as lost


def test_ipv6_server() -> None:
    async def scenario() -> None:
        async with Loopback("::1") as net:
            net.prober.set_link("lo", "", "::1")
            await net.wait("lo", True, 1.0)

    asyncio.run(scenario())


def test_a_missing_address_is_a_dead_link_until_it_is_fixed() -> None:
    async def scenario() -> None:
        async with Loopback() as net:
            net.prober.set_link("eth9", "", "192.0.2.77")  # not on this machine: EADDRNOTAVAIL
            await net.wait("eth9", False, 1.5)
            assert net.prober.health("eth9").loss > 0
            net.prober.set_link("eth9", "", "127.0.0.1")
            await net.wait("eth9", True, 1.0)

    asyncio.run(scenario())


def test_a_failing_handler_does_not_stop_probing() -> None:
    async def scenario() -> None:
        async with Loopback() as net:
            calls: list[bool] = []

            def broken(name: str, alive: bool) -> None:
                calls.append(alive)
                raise RuntimeError("boom")

            net.prober._on_change = broken
            net.prober.set_link("lo", "", "127.0.0.1")
            await asyncio.sleep(0.4)
            net.responder.silent = True
            await asyncio.sleep(1.0)
            assert calls == [True, False]

    asyncio.run(scenario())


def test_loss_counts_unanswered_probes() -> None:
    async def scenario() -> LinkHealth:
        async with Loopback(interval=0.05) as net:
            net.responder.drop = lambda seq: seq % 4 == 0
            net.prober.set_link("lo", "", "127.0.0.1")
            await asyncio.sleep(2.5)  # > 20 probes plus the 1 s it takes to call one lost
            return net.prober.health("lo")

    health = asyncio.run(scenario())
    assert 0.15 <= health.loss <= 0.35
    assert health.to_json()["loss"] == round(health.loss, 3)


def test_a_stalled_event_loop_is_not_a_dead_link() -> None:
    async def scenario() -> None:
        async with Loopback() as net:
            net.prober.set_link("lo", "", "127.0.0.1")
            await net.wait("lo", True, 1.0)
            time.sleep(1.2)  # the whole loop blocks: no probe goes out, no reply is read
            await asyncio.sleep(0.5)
            assert [alive for _, _, alive in net.events] == [True]
            net.responder.silent = True
            assert await net.wait("lo", False, 1.5) < MAX_SILENCE + 0.1

    asyncio.run(scenario())


def test_remove_link_stops_its_probes() -> None:
    async def scenario() -> None:
        async with Loopback() as net:
            net.prober.set_link("lo", "", "127.0.0.1")
            await net.wait("lo", True, 1.0)
            net.prober.remove_link("lo")
            answered = net.responder.stats.answered
            await asyncio.sleep(0.5)
            assert net.responder.stats.answered == answered
            with pytest.raises(KeyError):
                net.prober.health("lo")

    asyncio.run(scenario())


# --- in the namespace world --------------------------------------------------------------------

#: Runs inside the laptop namespace: one Prober per address family, a JSON line per verdict
#: change and, twice a second, one with every link's health.
SCRIPT = r"""
import asyncio, json, sys, time
from braid.daemon.links.health import Prober

def emit(**fields):
    print(json.dumps({"t": time.monotonic(), **fields}), flush=True)

async def main(config):
    probers = []
    for family, server, links in config["probers"]:
        def changed(name, alive, family=family):
            emit(family=family, link=name, alive=alive)
        prober = Prober(bytes.fromhex(config["key"]), (server, config["port"]), changed)
        for name, source in links:
            prober.set_link(name, name, source)
        await prober.start()
        probers.append((family, prober, [name for name, _ in links]))
    emit(started=True)
    while True:
        await asyncio.sleep(0.5)
        for family, prober, names in probers:
            emit(family=family, health={n: prober.health(n).to_json() for n in names})

asyncio.run(main(json.loads(sys.argv[1])))
"""

LINKS = [
    LinkSpec("eth0", "ethernet", 50, 10),
    LinkSpec("wlan0", "wifi", 30, 20),
    LinkSpec("usb0", "cellular", 20, 50),
    LinkSpec("lte0", "cellular", 20, 10),  # the lossy one, watched only for its loss figure
]
STEADY = ("eth0", "wlan0", "usb0")
LOSS = 0.2  # per direction: a round trip fails with probability 1 - 0.8**2 = 0.36


class Watch:
    """The prober process's output, read by a thread as it comes."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    def verdicts(self, after: float = 0.0) -> list[dict[str, Any]]:
        return [e for e in list(self.lines) if "alive" in e and e["t"] >= after]

    def wait(self, match: Callable[[dict[str, Any]], bool], after: float, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in list(self.lines):
                if event["t"] >= after and match(event):
                    return event
            if self.proc.poll() is not None:
                raise AssertionError(f"the prober exited with {self.proc.returncode}")
            time.sleep(0.01)
        raise AssertionError(f"nothing matching within {timeout} s; verdicts: {self.verdicts()}")

    def verdict(self, family: str, link: str, alive: bool, after: float, timeout: float) -> float:
        """Seconds from ``after`` until that verdict."""
        event = self.wait(
            lambda e: (e.get("family"), e.get("link"), e.get("alive")) == (family, link, alive),
            after,
            timeout,
        )
        return event["t"] - after


class Scene:
    def __init__(self, world: World, stack: BraidStack, watch: Watch, started: float) -> None:
        self.world, self.stack, self.watch, self.started = world, stack, watch, started


@pytest.fixture(scope="module")
def scene() -> Iterator[Scene]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with World(LINKS) as world:
        world.set_loss("lte0", LOSS)
        stack = BraidStack(world)
        pairing = parse_pairing(stack.init_server())
        stack.start_server()
        config = {
            "key": probe.key_from_token(pairing.token).hex(),
            "port": stack.server_port,
            "probers": [
                ["v4", world.server_v4, [[s.name, world.laptop_addr(s.name, 4)] for s in LINKS]],
                ["v6", world.server_v6, [[s.name, world.laptop_addr(s.name, 6)] for s in LINKS]],
            ],
        }
        proc = world.popen(
            "laptop",
            [sys.executable, "-c", SCRIPT, json.dumps(config)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            watch = Watch(proc)
            started = watch.wait(lambda e: "started" in e, 0.0, 10)["t"]
            yield Scene(world, stack, watch, started)
        finally:
            proc.terminate()
            proc.wait(5)
            stack.stop()


@pytest.mark.netns
@pytest.mark.timeout(60)
def test_all_links_alive_within_2_s(scene: Scene) -> None:
    for family in ("v4", "v6"):
        for name in STEADY:
            assert scene.watch.verdict(family, name, True, scene.started, 2.0) < 2.0


@pytest.mark.netns
def test_blackhole_detected_within_1_s_and_recovery_within_3_s(scene: Scene) -> None:
    began = time.monotonic()
    scene.world.blackhole("wlan0")
    try:
        dead = {f: scene.watch.verdict(f, "wlan0", False, began, 1.5) for f in ("v4", "v6")}
    finally:
        restored = time.monotonic()
        scene.world.restore("wlan0")
    alive = {f: scene.watch.verdict(f, "wlan0", True, restored, 3.5) for f in ("v4", "v6")}
    print(f"blackhole: dead after {dead}, alive again after {alive}")
    assert all(seconds < 1.0 for seconds in dead.values()), dead
    assert all(seconds < 3.0 for seconds in alive.values()), alive
    others = [e for e in scene.watch.verdicts(began) if e["link"] in ("eth0", "usb0")]
    assert others == [], "a working link was declared dead"


@pytest.mark.netns
def test_link_down_and_up(scene: Scene) -> None:
    began = time.monotonic()
    scene.world.link_down("usb0")
    try:
        dead = {f: scene.watch.verdict(f, "usb0", False, began, 1.5) for f in ("v4", "v6")}
    finally:
        up = time.monotonic()
        scene.world.link_up("usb0")
    alive = {f: scene.watch.verdict(f, "usb0", True, up, 3.5) for f in ("v4", "v6")}
    print(f"link down: dead after {dead}, alive again after {alive}")
    assert all(seconds < 1.0 for seconds in dead.values()), dead
    assert all(seconds < 3.0 for seconds in alive.values()), alive
    assert scene.stack.server is not None and scene.stack.server.poll() is None
    assert scene.watch.proc.poll() is None, "the prober crashed"


def _health_lines(scene: Scene, after: float) -> list[dict[str, Any]]:
    return [e for e in list(scene.watch.lines) if "health" in e and e["t"] >= after]


@pytest.mark.netns
def test_rtt_of_a_50_ms_link(scene: Scene) -> None:
    now = time.monotonic()
    scene.watch.wait(lambda e: "health" in e and e["family"] == "v4", now, 2.0)
    for line in _health_lines(scene, now):
        usb0 = line["health"]["usb0"]
        print(line["family"], "usb0", usb0)
        assert 45 <= usb0["rtt_ms"] <= 90
        assert usb0["jitter_ms"] is not None and usb0["jitter_ms"] < 20
        assert line["health"]["eth0"]["rtt_ms"] < usb0["rtt_ms"]


@pytest.mark.netns
def test_loss_tracks_the_link(scene: Scene) -> None:
    # Readings once the 20-probe window is full (4 s, plus 1 s to call a probe lost); the v4 and
    # v6 probers lose independently, and readings 4 s apart share no probe.
    window_full = scene.started + 5.0
    scene.watch.wait(lambda e: "health" in e, window_full + 4.0, 15)
    readings = [e["health"]["lte0"]["loss"] for e in _health_lines(scene, window_full)]
    mean = sum(readings) / len(readings)
    print(f"lte0 loss: mean {mean:.2f} over {len(readings)} readings, expected 0.36")
    assert 0.2 <= mean <= 0.55
    assert all(line["health"]["eth0"]["loss"] <= 0.1 for line in _health_lines(scene, window_full))
