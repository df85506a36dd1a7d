"""The reconciler against a recording fake platform: the one writer, and the races it removes.

No root: the platform, the pool and the prober are fakes (tests/daemon/fake_platform.py); the
policy, the reconciler and the command handlers are braidd's own.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from fake_platform import FakePlatform, Made, spreading

from braid.daemon import policy
from braid.daemon.commands import Commands
from braid.daemon.control.server import Caller
from braid.daemon.links.store import LinkStore
from braid.daemon.reconciler import PAIRING_FILE, Parts, Reconciler
from braid.daemon.routing.capture import OWN_MARK
from braid.daemon.settings import Settings
from braid.protocol.control import ControlError
from braid.protocol.pairing import Pairing

ROOT = Caller(pid=1, uid=0, gid=0, may_change=True)
PAIRING = Pairing("vps.example.net", 7443, "ab" * 32, "T" * 43)
OTHER = Pairing("other.example.net", 7443, "cd" * 32, "U" * 43)


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.platform = FakePlatform()
        self.platform.device("eth0", 2, "198.18.1.2")
        self.platform.device("wlan0", 3, "198.18.2.2")
        self.platform.kinds = {"eth0": ("ethernet", False), "wlan0": ("wifi", False)}
        self.platform.resolved = {
            "vps.example.net": ["198.18.0.10"],
            "other.example.net": ["198.18.0.20"],
        }
        self.made = Made()
        self.store = LinkStore(tmp).load()
        self.settings = Settings(tmp).load()
        self.state_dir = tmp
        self.r = Reconciler(
            self.platform,
            self.store,
            self.settings,
            tmp,
            {},
            None,
            spreading(self.platform, lambda: []),
            Parts(self.made.pool, self.made.prober),
        )
        self.statuses: list[dict] = []
        self.commands = Commands(
            self.r, self.settings, tmp, lambda: {"state": self.r.state()}, lambda w: None
        )
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> Rig:
        await self.r.reconcile()
        self.task = asyncio.create_task(self.r.run())
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.task is not None
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task

    async def settle(self) -> None:
        """Let the requests under way reach the writer, and the writer drain its queue."""
        await asyncio.sleep(0.02)
        await self.r.submit(self.r.nothing)

    async def up(self, pairing: Pairing = PAIRING) -> asyncio.Task:
        return asyncio.create_task(self.commands.up(ROOT, {"pairing": pairing.uri()}))


def run(scenario) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_links_are_applied_then_a_dead_link_withdrawn_and_failover(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Rig(tmp_path) as rig:
            assert set(rig.platform.routing) == {"eth0", "wlan0"}
            up = await rig.up()
            await rig.settle()
            pool, prober = rig.made.pools[0], rig.made.probers[0]
            assert prober.links == {"eth0": "198.18.1.2", "wlan0": "198.18.2.2"}
            assert pool.addresses == ["198.18.0.10"] and pool.mark == prober.mark == OWN_MARK
            pool.connect()
            status = await up
            assert status["state"] == "connected"
            assert rig.r.best == "eth0"
            prober.say("eth0", False)
            await rig.settle()
            assert rig.platform.withdrawn == {"eth0"} and rig.r.best == "wlan0"
            assert pool.refreshed >= 1
            assert [e["event"] for e in rig.r.events][-2:] == ["link-lost", "failover"]

    run(scenario)


def test_a_captive_portal_takes_a_link_out_until_signed_in(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Rig(tmp_path) as rig:
            up = await rig.up()
            await rig.settle()
            pool, prober = rig.made.pools[0], rig.made.probers[0]
            pool.connect()
            await up
            assert rig.r.best == "eth0"
            rig.platform.connectivity_of = {"eth0": "portal", "wlan0": "full"}
            await rig.settle()
            assert set(rig.platform.routing) == {"wlan0"} and rig.r.best == "wlan0"
            assert set(prober.links) == {"wlan0"}
            (eth0,) = [
                link for link in await rig.commands.links(ROOT, {}) if link["name"] == "eth0"
            ]
            assert eth0["connectivity"] == "portal" and eth0["alive"] is None
            assert eth0["state"] == "up" and not eth0["carrying"]
            assert "sign-in-required" in [e["event"] for e in rig.r.events]
            rig.platform.connectivity_of = {"eth0": "full", "wlan0": "full"}
            await rig.settle()
            assert set(rig.platform.routing) == {"eth0", "wlan0"} and rig.r.best == "eth0"
            assert set(prober.links) == {"eth0", "wlan0"}

    run(scenario)


def test_a_down_while_up_waits_for_its_tunnel_answers_both_clearly(tmp_path: Path) -> None:
    """Before: the up re-read the daemon's pool while polling, and a down in between made it
    fail with "internal error: 'NoneType'…"."""

    async def scenario() -> None:
        async with Rig(tmp_path) as rig:
            up = await rig.up()
            await rig.settle()
            down = await rig.commands.down(ROOT, {})
            assert down["state"] == "disconnected"
            status = await up  # no traceback: the up saw its pool replaced and answers
            assert status["state"] == "disconnected"
            assert rig.made.pools[0].stopped and rig.made.probers[0].stopped

    run(scenario)


def test_overlapping_ups_leave_one_prober_running(tmp_path: Path) -> None:
    """Before: each up started a Prober and the first was overwritten, never stopped."""

    async def scenario() -> None:
        async with Rig(tmp_path) as rig:
            first = await rig.up(PAIRING)
            second = await rig.up(OTHER)
            await rig.settle()
            running = [p for p in rig.made.probers if p.running]
            assert len(running) == 1 and running[0].server == ("198.18.0.20", 7443)
            assert all(p.stopped for p in rig.made.probers if p is not running[0])
            rig.made.pools[-1].connect()
            await asyncio.gather(first, second)
            assert rig.r.pairing == OTHER
            saved = json.loads((tmp_path / PAIRING_FILE).read_text())
            assert saved["uri"] == OTHER.uri()

    run(scenario)


def test_a_wrong_token_is_reported_and_disconnects(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Rig(tmp_path) as rig:
            up = await rig.up()
            await rig.settle()
            rig.made.pools[0].refuse("wrong token: the server refused it")
            with pytest.raises(ControlError, match="wrong token"):
                await up
            await rig.settle()
            assert rig.r.pool is None and rig.r.state() == "disconnected"

    run(scenario)


def test_no_stale_routing_after_a_device_vanishes_during_a_slow_apply(tmp_path: Path) -> None:
    """Before: applies ran concurrently from the link loop, set-link and set-order, and a stale
    one could reinstall the routing of a device already removed."""

    async def scenario() -> None:
        async with Rig(tmp_path) as rig:
            gate = asyncio.Event()
            rig.platform.apply_gate = gate
            # A set-link (an apply of the old view) and the device vanishing meanwhile.
            change = asyncio.create_task(
                rig.commands.set_link(ROOT, {"link": "wlan0", "priority": "backup"})
            )
            await asyncio.sleep(0.05)
            del rig.platform.devices["wlan0"]
            rig.r.poke()
            gate.set()
            rig.platform.apply_gate = None
            with pytest.raises(ControlError, match="vanished meanwhile; its settings are kept"):
                await change
            await rig.settle()
            assert rig.store.choice("wlan0").priority == "backup"
            assert "wlan0" not in rig.platform.routing
            removed = rig.platform.calls.index(("remove", "wlan0"))
            assert ("apply", "wlan0") not in rig.platform.calls[removed:]

    run(scenario)


def test_test_pairing_switches_nothing(tmp_path: Path, monkeypatch) -> None:
    """Before: the tray's Test connection did a real up, switching the tunnel and saving."""
    opened = []

    class FakeTunnel:
        async def close(self) -> None:
            opened.append("closed")

    async def fake_open(pairing, **kw):
        opened.append((pairing.server, kw["addresses"], kw["bind"], kw["mark"]))
        return FakeTunnel()

    monkeypatch.setattr("braid.daemon.commands.open_tunnel", fake_open)

    async def scenario() -> None:
        async with Rig(tmp_path) as rig:
            up = await rig.up(PAIRING)
            await rig.settle()
            rig.made.pools[0].connect()
            await up
            result = await rig.commands.test_pairing(ROOT, {"pairing": OTHER.uri()})
            assert result["server"] == OTHER.server and result["link"] == "eth0"
            assert opened == [
                (OTHER.server, ["198.18.0.20"], ("198.18.1.2", 0), OWN_MARK),
                "closed",
            ]
            assert rig.r.pairing == PAIRING and len(rig.made.pools) == 1
            assert json.loads((tmp_path / PAIRING_FILE).read_text())["uri"] == PAIRING.uri()

    run(scenario)


def test_pool_size_and_probe_interval_apply_live(tmp_path: Path) -> None:
    """Before: they did nothing until the next reconnect."""

    async def scenario() -> None:
        async with Rig(tmp_path) as rig:
            up = await rig.up()
            await rig.settle()
            rig.made.pools[0].connect()
            await up
            await rig.commands.set_settings(
                ROOT, {"settings": {"pool_size": 7, "probe_interval_ms": 500}}
            )
            assert rig.made.pools[0].size == 7
            assert rig.made.probers[0].interval == 0.5
            assert len(rig.made.pools) == 1  # no reconnect
            schema = (await rig.commands.get_settings(ROOT, {}))["schema"]
            assert {s["key"]: s["applies"] for s in schema}["pool_size"] == "now"

    run(scenario)


def test_bad_settings_change_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Rig(tmp_path) as rig:
            before = dict(rig.settings.values)
            with pytest.raises(ControlError):
                await rig.commands.set_settings(ROOT, {"settings": {"pool_size": "many"}})
            with pytest.raises(ControlError):
                await rig.commands.set_link(ROOT, {"link": "eth0", "priority": "sometimes"})
            assert rig.settings.values == before
            assert rig.store.choice("eth0").priority is None

    run(scenario)


def test_system_mode_blocks_while_the_server_is_lost_and_recovers(tmp_path: Path) -> None:
    """A lost server: capture stays (blocked), the state says so, and when the pool reaches
    the server again — at the addresses resolved at up, with no new lookup — capture carries."""

    async def scenario() -> None:
        async with Rig(tmp_path) as rig:
            rig.settings.update({"mode": "system", "when_server_unreachable": "block"})
            up = await rig.up()
            await rig.settle()
            pool = rig.made.pools[0]
            pool.connect()
            await up
            await rig.settle()
            assert rig.r.capture_in_force() == "tunnel" and rig.r.capture_active
            pool.lose("connection refused")
            await rig.settle()
            assert rig.r.state() == "connecting" and rig.r.capture_in_force() == "blocked"
            assert [e["event"] for e in rig.r.events][-1] == "server-unreachable"
            pool.connect()
            await rig.settle()
            assert rig.r.state() == "connected" and rig.r.capture_in_force() == "tunnel"
            lookups = [c for c in rig.platform.calls if c[0] == "resolve"]
            assert lookups == [("resolve", "vps.example.net")]

    run(scenario)


def test_policy_inputs_use_the_stored_choices(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Rig(tmp_path) as rig:
            await rig.commands.set_order(ROOT, {"links": ["wlan0", "eth0"]})
            assert rig.r.best == "wlan0"
            assert [link.name for link in policy.ordered(rig.r.links)] == ["wlan0", "eth0"]

    run(scenario)


def test_braidd_resumes_only_what_the_user_left_connected(tmp_path: Path) -> None:
    """After a reboot the laptop reconnects by itself, unless the user had said down."""
    from braid.daemon.commands import read_saved_pairing

    async def scenario() -> None:
        async with Rig(tmp_path) as rig:
            assert read_saved_pairing(tmp_path, to_resume=True) is None  # never paired
            up = await rig.up()
            await rig.settle()
            rig.made.pools[0].connect()
            await up
            assert read_saved_pairing(tmp_path, to_resume=True) == PAIRING
            await rig.commands.down(ROOT, {})
            assert read_saved_pairing(tmp_path, to_resume=True) is None
            assert read_saved_pairing(tmp_path) == PAIRING  # `braid up` alone still uses it
        async with Rig(tmp_path) as rig:  # braidd started again: resume waits for no one
            await rig.r.submit(rig.r.resume, PAIRING, ["198.18.0.10"])
            assert rig.made.pools and rig.r.pairing == PAIRING
            rig.r.pairing = OTHER  # a user's up came first: resume leaves it alone
            await rig.r.submit(rig.r.resume, PAIRING, ["198.18.0.10"])
            assert len(rig.made.pools) == 1

    run(scenario)


def test_a_change_waiting_when_braidd_stops_is_answered_not_left_hanging(tmp_path: Path) -> None:
    async def scenario() -> None:
        rig = Rig(tmp_path)
        await rig.r.reconcile()

        async def slow() -> None:  # an up still at work, say
            await asyncio.Event().wait()

        task = asyncio.create_task(rig.r.run())
        working = asyncio.create_task(rig.r.submit(slow))
        queued = asyncio.create_task(rig.r.submit(rig.r.nothing))
        await asyncio.sleep(0.05)
        task.cancel()  # SIGTERM
        with pytest.raises(asyncio.CancelledError):
            await task
        for waiting in (working, queued):
            with pytest.raises(ControlError, match="stopping"):
                await asyncio.wait_for(waiting, 1)

    run(scenario)


def test_a_calls_link_is_held_while_the_call_lasts_and_freed_after(tmp_path: Path) -> None:
    """Headroom for calls: once connected, every link that showed its rate gets a limit 20 % (the
    default) under its fastest second; a call holds its link to it once a queue builds there,
    by the gate alone (the limits keep counting), until the call ends; down removes them."""
    calls: set[str] = set()

    async def second(rig: Rig, rx: dict[str, int]) -> None:
        await asyncio.sleep(0.05)
        rig.platform.io = {n: (rig.platform.io.get(n, (0, 0))[0] + b, 0) for n, b in rx.items()}
        await rig.r.submit(rig.r.sample, {})

    async def scenario() -> None:
        async with Rig(tmp_path) as rig:
            rig.r._call_links = lambda: set(calls)
            up = await rig.up()
            await rig.settle()
            rig.made.pools[0].connect()
            await up
            prober = rig.made.probers[0]
            await second(rig, {"eth0": 0, "wlan0": 0})
            # A download (200 / 120 Mbit/s over the test's 0.05 s "second"; over 10 Mbit/s
            # however late the sample runs).
            await second(rig, {"eth0": 1_250_000, "wlan0": 750_000})
            peaks = dict(rig.r.peaks)
            assert peaks["eth0"] > 10_000_000 and peaks["wlan0"] > 6_000_000
            want = {name: int(peak * 0.8 / 8) for name, peak in peaks.items()}
            assert rig.platform.limits == want and rig.platform.gated == set()
            assert rig.platform.calls[-1][4:] == (["198.18.0.10"], 7443)
            calls.add("eth0")
            await second(rig, {"eth0": 1_000, "wlan0": 1_000})
            assert rig.platform.gated == set()  # a call, but no queue on its link: not held
            prober.rtt_ms["eth0"] = 28.0  # the download's queue at eth0's provider
            await second(rig, {"eth0": 1_000, "wlan0": 1_000})
            # Only the gate changes: the limits stay as they were (their buckets too).
            assert rig.platform.calls[-1][1:4] == (want, want, {"eth0"})
            assert rig.platform.limits == want and rig.r.held == {"eth0": want["eth0"]}
            prober.rtt_ms["eth0"] = 10.0  # held: the queue drained; the link stays held
            held_peak, wlan_peak = rig.r.peaks["eth0"], rig.r.peaks["wlan0"]
            for _ in range(3):  # and its slow seconds do not lower its peak
                await second(rig, {"eth0": 10, "wlan0": 10})
            assert rig.platform.gated == {"eth0"}
            assert rig.r.peaks["eth0"] == held_peak
            assert rig.r.peaks["wlan0"] < wlan_peak
            calls.clear()
            await second(rig, {"eth0": 10, "wlan0": 10})
            assert rig.platform.gated == set() and rig.r.held == {}
            calls.add("eth0")
            prober.rtt_ms["eth0"] = 28.0
            await second(rig, {"eth0": 10, "wlan0": 10})
            assert rig.platform.gated == {"eth0"}
            await rig.r.submit(rig.r.down)
            assert rig.platform.limits == {} and rig.platform.gated == set()

    run(scenario)


def test_tables_removed_from_outside_are_put_back(tmp_path: Path) -> None:
    """A firewall reload flushes the ruleset: the capture table and the headroom table (with a
    call's link held) come back whole at the next check, the status keeps working meanwhile,
    and a check with nothing missing changes nothing."""

    async def scenario() -> None:
        async with Rig(tmp_path) as rig:
            rig.settings.update({"mode": "system"})
            rig.r._call_links = lambda: {"eth0"}
            up = await rig.up()
            await rig.settle()
            rig.made.pools[0].connect()
            await up
            await rig.settle()
            rig.platform.io = {"eth0": (0, 0), "wlan0": (0, 0)}
            await rig.r.submit(rig.r.sample, {})
            await asyncio.sleep(0.05)
            rig.platform.io = {"eth0": (1_250_000, 0), "wlan0": (750_000, 0)}
            await rig.r.submit(rig.r.sample, {})
            rig.made.probers[0].rtt_ms["eth0"] = 28.0  # a download's queue: the call holds eth0
            await asyncio.sleep(0.05)
            rig.platform.io = {"eth0": (1_251_000, 0), "wlan0": (751_000, 0)}
            await rig.r.submit(rig.r.sample, {})
            assert rig.r.capture_active and rig.platform.gated == {"eth0"}
            limits, held = dict(rig.platform.limits), rig.r.held
            before = len(rig.platform.calls)
            await rig.r.submit(rig.r.check_tables)
            await rig.settle()
            assert rig.platform.calls[before:] == [] and rig.r.tables_restored == 0
            rig.platform.flushed = {"inet braid", "inet braid_headroom"}
            await rig.r.submit(rig.r.check_tables)
            assert rig.r.held == held  # the status keeps working before the pass
            await rig.settle()
            again = rig.platform.calls[before:]
            assert ("capture", True) in again
            assert [c[1:4] for c in again if c[0] == "headroom"] == [(None, limits, {"eth0"})]
            assert rig.platform.flushed == set() and rig.r.tables_restored == 1
            assert rig.r.capture_active and rig.r.held == held

    run(scenario)
