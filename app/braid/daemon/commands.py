"""The control commands: check the request, hand state changes to the writer, answer.

Each handler validates its arguments first, so a bad request changes nothing. Changes run on
the reconciler (:meth:`Reconciler.submit`), one at a time; slow work that changes nothing —
resolving the server's name, waiting for the first tunnel, testing a pairing — runs here,
outside the writer. docs/control-api.md describes every command (a test checks the list).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from braid.daemon.control.server import Caller
from braid.daemon.links.store import StoreError
from braid.daemon.reconciler import PAIRING_FILE, Reconciler
from braid.daemon.routing.capture import OWN_MARK
from braid.daemon.routing.policy import SLOTS
from braid.daemon.settings import SETTINGS, Settings
from braid.files import load_json
from braid.protocol import control
from braid.protocol.control import ControlError, ErrorCode
from braid.protocol.events import Event, EventKind
from braid.protocol.pairing import Pairing, PairingError, parse_pairing
from braid.tunnel_client import TunnelError, open_tunnel

log = logging.getLogger(__name__)

UP_WAIT = 12.0  # how long `up` waits for the first tunnel, to report a wrong token at once
TEST_TIMEOUT = 10.0
SAMPLE_INTERVAL = 1.0
#: Settings that act only on what opens next; every other one applies at once.
AT_NEXT_CONNECTION: frozenset[str] = frozenset()


class Commands:
    def __init__(
        self,
        reconciler: Reconciler,
        settings: Settings,
        state_dir,
        status: Callable[[], dict],
        subscribe: Callable[[Any], None],
    ) -> None:
        self.r = reconciler
        self.settings = settings
        self.state_dir = state_dir
        self._status = status
        self._subscribe = subscribe
        #: The MPTCP counters when braidd started: `doctor` counts from there.
        self._counters_at_start: dict[str, int] | None = None
        self._doctor_run: asyncio.Future | None = None
        self._speed_running = False

    async def start(self) -> None:
        """What the commands need to know from the start (run once braidd is set up)."""
        from braid.daemon import doctor

        self._counters_at_start = await asyncio.to_thread(doctor.read_counters)

    def table(self) -> dict[str, Callable]:
        return {
            "status": self.status,
            "subscribe": self.subscribe,
            "up": self.up,
            "down": self.down,
            "test-pairing": self.test_pairing,
            "links": self.links,
            "interfaces": self.interfaces,
            "set-link": self.set_link,
            "add-link": self.add_link,
            "remove-link": self.remove_link,
            "set-order": self.set_order,
            "get-settings": self.get_settings,
            "set-settings": self.set_settings,
            "route-process": self.route_process,
            "doctor": self.doctor,
            "speed-test": self.speed_test,
        }

    #: The commands that change state: braidd refuses them to callers without the right.
    CHANGES = frozenset(
        {
            "up",
            "down",
            "test-pairing",
            "set-link",
            "add-link",
            "remove-link",
            "set-order",
            "set-settings",
            "route-process",
            "speed-test",  # it costs data on every link, metered ones included
        }
    )

    # -- reading ------------------------------------------------------------------

    async def status(self, caller: Caller, request: dict) -> dict:
        return self._status()

    async def subscribe(self, caller: Caller, request: dict) -> dict:
        self._subscribe(request["_writer"])
        return {"interval": SAMPLE_INTERVAL, "status": self._status()}

    async def links(self, caller: Caller, request: dict) -> list:
        return [link.to_json() for link in self.r.ordered()]

    async def get_settings(self, caller: Caller, request: dict) -> dict:
        return {
            "values": dict(self.settings.values),
            "schema": [
                {
                    **s.describe(),
                    "applies": "next-connection" if s.key in AT_NEXT_CONNECTION else "now",
                }
                for s in SETTINGS
            ],
        }

    async def doctor(self, caller: Caller, request: dict) -> dict:
        """Why Braid does or does not aggregate, per link (read-only; a few seconds at most)."""
        # One run at a time, shared by whoever asks meanwhile: anyone may ask, and each run
        # opens connections to the server.
        if self._doctor_run is None or self._doctor_run.done():
            from braid.aio import spawn

            self._doctor_run = spawn(self._diagnose(), name="doctor")
        return await asyncio.shield(self._doctor_run)

    async def _diagnose(self) -> dict:
        from braid.daemon import doctor

        observations = await doctor.observe(self.r, OWN_MARK, self._counters_at_start)
        return doctor.diagnose(observations, self.r.pairing.port if self.r.pairing else None)

    async def speed_test(self, caller: Caller, request: dict) -> dict:
        """Each link's download and upload to the server, then all bonded (bounded in time and
        volume; progress lines go to the caller before the answer)."""
        from braid.daemon import speed

        seconds = request.get("seconds")
        if seconds is not None and (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not speed.MIN_SECONDS <= seconds <= speed.MAX_SECONDS
        ):
            raise ControlError(
                ErrorCode.INVALID_ARGUMENT,
                f"seconds must be a number from {speed.MIN_SECONDS:g} to {speed.MAX_SECONDS:g}",
            )
        if self._speed_running:
            raise ControlError(
                ErrorCode.FAILED,
                "a speed test is running already: wait for it to end (at most "
                f"{speed.TIME_LIMIT:.0f} s) and ask again",
            )
        writer, request_id = request["_writer"], request.get("id")

        def progress(news: dict) -> None:
            if writer.is_closing():  # the caller went away: stop moving data for nobody
                raise ControlError(ErrorCode.FAILED, "the caller closed the connection")
            writer.write(control.progress(request_id, news))

        log.info("speed test requested by %s", caller.describe())
        self._speed_running = True
        try:
            result = await speed.run_speed_test(self.r, OWN_MARK, seconds, progress)
        except ControlError as exc:
            log.info("speed test ended without a result: %s", exc.message)
            raise
        finally:
            self._speed_running = False
        log.info(
            "speed test: %s",
            ", ".join(
                f"{entry['name']} down {entry['down_mbps']} up {entry['up_mbps']} Mbit/s"
                for entry in [*result["links"], result["bonded"]]
                if not entry["skipped"]
            ),
        )
        return result

    # -- pairing ------------------------------------------------------------------

    def saved_pairing(self) -> Pairing | None:
        return read_saved_pairing(self.state_dir)

    def _pairing_from(self, request: dict, required: bool = False) -> Pairing:
        uri = request.get("pairing")
        if uri is not None and not isinstance(uri, str):
            raise ControlError(ErrorCode.INVALID_ARGUMENT, "pairing must be a string")
        if uri:
            try:
                return parse_pairing(uri)
            except PairingError as exc:
                raise ControlError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
        pairing = None if required else (self.r.pairing or self.saved_pairing())
        if pairing is None:
            raise ControlError(
                ErrorCode.INVALID_ARGUMENT,
                "Braid is not paired with a server yet: run  braid up --pairing -  and paste "
                "the URI that braid-server init printed (or braid up --pairing-file FILE)",
            )
        return pairing

    async def _resolve(self, pairing: Pairing) -> list[str]:
        if pairing == self.r.pairing and self.r.server_addresses:
            return list(self.r.server_addresses)  # known: no lookup that capture would take
        try:
            addresses = await self.r.platform.resolve(pairing.host, pairing.port)
        except OSError as exc:
            raise ControlError(
                ErrorCode.FAILED, f"cannot resolve the server name {pairing.host}: {exc}"
            ) from None
        if not addresses:
            raise ControlError(ErrorCode.FAILED, f"{pairing.host} has no address")
        return addresses

    async def up(self, caller: Caller, request: dict) -> dict:
        pairing = self._pairing_from(request)
        mode = request.get("mode")
        if mode is not None:
            try:
                next(s for s in SETTINGS if s.key == "mode").check(mode)
            except ValueError as exc:
                raise ControlError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
        log.info("up requested by %s (server %s)", caller.describe(), pairing.server)
        addresses = await self._resolve(pairing)

        async def change():
            if mode is not None:
                self.settings.update({"mode": mode})
            return await self.r.up(pairing, addresses)

        try:
            pool = await self.r.submit(change)
        except OSError as exc:
            raise ControlError(
                ErrorCode.FAILED, f"cannot save the pairing in {self.state_dir}: {exc}"
            ) from None
        # Wait for the first tunnel (outside the writer) so a wrong token is reported at once.
        deadline = time.monotonic() + UP_WAIT
        # Connected once the reconciler's pass has seen it: the answer's state says so then.
        while time.monotonic() < deadline and not (
            (pool.connected and self.r.connected_since is not None) or pool.fatal_error
        ):
            if self.r.pool is not pool:
                break  # a later up or down replaced it: that caller has the news
            await asyncio.sleep(0.05)
        if pool.fatal_error:
            message = pool.fatal_error
            await self.r.submit(self.r.down, pool)
            raise ControlError(ErrorCode.FAILED, message)
        return self._status()

    async def down(self, caller: Caller, request: dict) -> dict:
        log.info("down requested by %s", caller.describe())
        try:
            await self.r.submit(self.r.disconnect)
        except OSError as exc:  # disconnected, but braidd will connect again when it starts
            raise self._cannot_save(exc) from None
        return self._status()

    async def test_pairing(self, caller: Caller, request: dict) -> dict:
        """Open one tunnel with the given pairing and close it; nothing saved or switched."""
        pairing = self._pairing_from(request, required=True)
        addresses = await self._resolve(pairing)
        source = None
        family_hint = None
        for address in addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            source = self.r.best_source(family)
            if source is not None:
                family_hint = family
                break
        started = time.monotonic()
        try:
            tunnel = await open_tunnel(
                pairing,
                bind=(source, 0) if source else None,
                family_hint=family_hint,
                timeout=TEST_TIMEOUT,
                addresses=addresses,
                mark=OWN_MARK,
            )
        except TunnelError as exc:
            raise ControlError(ErrorCode.FAILED, str(exc)) from None
        elapsed = time.monotonic() - started
        await tunnel.close()
        return {
            "server": pairing.server,
            "address": addresses,
            "elapsed_ms": round(elapsed * 1000, 1),
            "link": next(
                (link.name for link in self.r.links.values() if source in link.addresses), None
            ),
        }

    # -- links ------------------------------------------------------------------------

    def _cannot_save(self, exc: OSError) -> ControlError:
        return ControlError(
            ErrorCode.FAILED,
            f"cannot save to {self.state_dir}: {exc.strerror or exc} — nothing was "
            "changed; free some disk space or fix the directory's permissions",
        )

    async def set_link(self, caller: Caller, request: dict) -> dict:
        name = request.get("link")
        if not isinstance(name, str) or name not in self.r.links:
            known = ", ".join(self.r.links) or "none"
            raise ControlError(
                ErrorCode.INVALID_ARGUMENT,
                f"no link {name!r} (links: {known}); to use an interface braidd skipped: "
                f"braid links add {name} --kind KIND",
            )
        changes = {
            k: request[k] for k in ("kind", "priority", "order", "metered", "cap") if k in request
        }
        if not changes:
            raise ControlError(
                ErrorCode.INVALID_ARGUMENT,
                "nothing to change: give priority, order, metered or cap",
            )

        async def change() -> None:
            store = self.r.store
            choice = store.choice(name)
            before = choice.to_json()
            try:
                choice.update(changes)
            except StoreError as exc:
                choice.update(before)
                raise ControlError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
            try:
                store.save_choices()
            except OSError as exc:
                choice.update(before)
                raise self._cannot_save(exc) from None
            log.info("link %s changed by %s: %s", name, caller.describe(), changes)

        await self.r.submit(change)
        link = self.r.links.get(name)
        if link is None:
            raise ControlError(
                ErrorCode.FAILED,
                f"{name} vanished meanwhile; its settings are kept for when it returns",
            )
        return link.to_json()

    async def interfaces(self, caller: Caller, request: dict) -> list:
        """Every interface and what discovery makes of it: those not links can be added."""
        found = await self.r.platform.interfaces()
        return [
            {"name": c.name, "kind": c.kind, "link": c.name in self.r.links, "reason": c.reason}
            for c in found
            if c.name != "lo"
        ]

    async def add_link(self, caller: Caller, request: dict) -> dict:
        """Make an interface that discovery skipped a link, kept across restarts."""
        name, kind = request.get("link"), request.get("kind")
        if not isinstance(name, str) or not name:
            raise ControlError(ErrorCode.INVALID_ARGUMENT, "link must be an interface name")
        if name == "lo":
            raise ControlError(ErrorCode.INVALID_ARGUMENT, "loopback cannot be a link")
        try:
            socket.if_nametoindex(name)
        except (OSError, ValueError):
            raise ControlError(
                ErrorCode.INVALID_ARGUMENT,
                f"no interface {name!r} on this computer (plug it in first; see: ip link)",
            ) from None

        async def change() -> None:
            if name in self.r.links:
                raise ControlError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"{name} is already a link; change it with: braid links set {name} …",
                )
            if len(self.r.links) >= SLOTS:
                raise ControlError(ErrorCode.INVALID_ARGUMENT, f"Braid uses at most {SLOTS} links")
            store = self.r.store
            had = name in store.choices
            choice = store.choice(name)
            before = choice.to_json()
            try:
                choice.update({"kind": kind} if kind is not None else {})
                choice.added = True
                store.save_choices()
            except (StoreError, OSError) as exc:
                if had:
                    choice.update(before)
                    choice.added = before["added"]
                else:
                    del store.choices[name]
                if isinstance(exc, OSError):
                    raise self._cannot_save(exc) from None
                raise ControlError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
            log.info("link %s added by %s (kind %s)", name, caller.describe(), kind or "other")

        await self.r.submit(change)
        link = self.r.links.get(name)
        if link is None:
            raise ControlError(ErrorCode.FAILED, f"{name} vanished meanwhile; it stays added")
        self.r.event(Event(EventKind.LINK_ADDED, name, f"{name} added ({link.kind})"))
        return link.to_json()

    async def remove_link(self, caller: Caller, request: dict) -> list:
        """Forget an interface the user added: it stops being a link."""
        name = request.get("link")

        async def change() -> None:
            store = self.r.store
            choice = store.choices.get(name) if isinstance(name, str) else None
            if choice is None or not choice.added:
                added = ", ".join(store.added()) or "none"
                if isinstance(name, str) and name in self.r.links:
                    how = (
                        "it is named with --link in braidd's command line"
                        if self.r.links[name].configured
                        else f"braidd found it itself; to stop using it: braid links set {name} "
                        "--priority never"
                    )
                    message = f"{name} was not added with braid links add: {how}"
                else:
                    message = f"no added link {name!r} (added links: {added})"
                raise ControlError(ErrorCode.INVALID_ARGUMENT, message)
            del store.choices[name]
            try:
                store.save_choices()
            except OSError as exc:
                store.choices[name] = choice
                raise self._cannot_save(exc) from None
            log.info("link %s removed by %s", name, caller.describe())

        await self.r.submit(change)
        return [link.to_json() for link in self.r.ordered()]

    async def set_order(self, caller: Caller, request: dict) -> list:
        names = request.get("links")

        async def change() -> None:
            if not isinstance(names, list) or sorted(names) != sorted(self.r.links):
                raise ControlError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"links must list every link exactly once: {', '.join(sorted(self.r.links))}",
                )
            store = self.r.store
            before = {name: store.choice(name).order for name in names}
            for order, name in enumerate(names):
                store.choice(name).order = order
            try:
                store.save_choices()
            except OSError as exc:
                for name, order in before.items():
                    store.choice(name).order = order
                raise self._cannot_save(exc) from None

        await self.r.submit(change)
        return [link.to_json() for link in self.r.ordered()]

    # -- applications -----------------------------------------------------------------

    async def route_process(self, caller: Caller, request: dict) -> dict:
        """`braid direct` / `braid bonded`: the caller itself (by SO_PEERCRED) joins a group."""
        route = request.get("route")
        if route not in ("direct", "bonded"):
            raise ControlError(ErrorCode.INVALID_ARGUMENT, "route must be direct or bonded")
        return await self.r.submit(_route_process, self.r, caller, route)

    # -- settings ---------------------------------------------------------------------

    async def set_settings(self, caller: Caller, request: dict) -> dict:
        changes = request.get("settings")
        if not isinstance(changes, dict):
            raise ControlError(ErrorCode.INVALID_ARGUMENT, "settings must be an object")

        async def change() -> dict:
            before = dict(self.settings.values)
            try:
                self.settings.update(changes)
            except ValueError as exc:
                raise ControlError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
            except OSError as exc:
                self.settings.values = before
                raise self._cannot_save(exc) from None
            changed = {k for k in changes if before.get(k) != self.settings.values.get(k)}
            return await self.r.apply_settings(changed) if changed else dict(self.settings.values)

        return await self.r.submit(change)


async def _route_process(r: Reconciler, caller: Caller, route: str) -> dict:
    """Move the calling process into Braid's ``route`` cgroup (the writer runs this)."""
    if r.apps is None:
        raise ControlError(
            ErrorCode.FAILED,
            "braidd has no cgroups for applications on this system (cgroup v2 is needed; "
            "see braidd's log)",
        )
    if route == "bonded" and r.pool is None:
        raise ControlError(ErrorCode.FAILED, "Braid is not connected (run: braid up)")
    try:
        r.apps.join(route, caller.pid)
    except OSError as exc:
        raise ControlError(ErrorCode.FAILED, f"cannot move process {caller.pid}: {exc}") from None
    if route == "bonded":
        r.bonded_apps = True
    return {"route": route, "pid": caller.pid}


def read_saved_pairing(state_dir, to_resume: bool = False) -> Pairing | None:
    """The pairing last used (``to_resume``: only if the user left Braid connected)."""
    path = state_dir / PAIRING_FILE
    try:
        data = load_json(path.read_text())
        uri = data.get("uri") if isinstance(data, dict) else None
        if not isinstance(uri, str):
            raise ValueError("no pairing URI (uri) in it")
        pairing = parse_pairing(uri)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # PairingError is a ValueError
        log.warning("ignoring unreadable %s: %s", path, exc)
        return None
    if to_resume and data.get("connect") is not True:
        return None  # disconnected by the user, or saved by a version that did not resume
    return pairing


__all__ = ["Commands", "read_saved_pairing"]
