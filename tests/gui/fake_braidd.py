"""A stand-in braidd for the tray's tests and benchmark: the real protocol on a real Unix socket.

It answers every control command the tray uses from a small in-memory state and pushes
samples and events when a test asks, so the tray's own client, model and views run
unchanged against it. It can stop and start again on the same path (a daemon restart)
and refuse chosen commands as ``forbidden`` (a user outside the braid group).
"""

from __future__ import annotations

import contextlib
import copy
import socket
import threading
import time
from pathlib import Path
from typing import Any

from braid.daemon.commands import Commands
from braid.protocol import control
from braid.protocol.control import ControlError, ErrorCode
from braid.protocol.pairing import PairingError, parse_pairing

_LATER = object()  # a handler's answer that comes later, from a thread of its own
CHANGES = set(Commands.CHANGES)  # the commands that need an operator, as braidd has them
SCHEMA = [
    {
        "key": "discover_links",
        "type": "bool",
        "default": True,
        "label": "Use every link found",
        "help": "Bond every interface the daemon finds.",
    },
    {
        "key": "probe_interval_ms",
        "type": "int",
        "default": 200,
        "label": "Health probe interval (ms)",
        "help": "How often each link asks the server for an echo.",
        "minimum": 50,
        "maximum": 2000,
    },
    {
        "key": "mode",
        "type": "str",
        "default": "proxy",
        "label": "Traffic mode",
        "help": "proxy: only applications set to use the SOCKS5 proxy go through Braid.",
        "choices": ["proxy"],
    },
]


def make_link(name: str, kind: str, order: int, priority: str = "always") -> dict[str, Any]:
    """A link object as braidd reports it (docs/control-api.md)."""
    return {
        "name": name,
        "kind": kind,
        "priority": priority,
        "effective_priority": priority,
        "order": order,
        "added": False,
        "state": "up",
        "alive": True,
        "carrying": True,
        "subflows": 2,
        "addresses": [f"198.18.{order + 1}.2"],
        "rx_bps": 0,
        "tx_bps": 0,
        "rx_bytes": 0,
        "tx_bytes": 0,
        "metered": kind == "cellular",
        "cap": None,
        "used_bytes": 0,
        "capped": False,
        "rtt_ms": 10.0 * (order + 1),
        "jitter_ms": 0.5,
        "loss": 0.0,
        "connectivity": None,
    }


class FakeBraidd:
    """Serves one control socket from threads; every request it got is kept in ``requests``."""

    def __init__(self, path: Path, links: list[tuple[str, str]] | None = None) -> None:
        self.path = Path(path)
        pairs = links or [("eth0", "ethernet"), ("wlan0", "wifi"), ("usb0", "cellular")]
        self.links = [make_link(name, kind, i) for i, (name, kind) in enumerate(pairs)]
        # interfaces that are not links: (name, kind, what discovery made of it)
        self.others = [("veth0", "other", "virtual device: veth pair"), ("enx0c5b", "ethernet", "")]
        self.state = "disconnected"
        self.error: str | None = None  # the pool's last error, as braidd reports it
        # The pairing it keeps from an earlier "up" (None: never paired); reported while up.
        self.saved: tuple[str, str] | None = ("198.18.20.2:7443", "3f" * 32)
        self.server: str | None = None
        self.fingerprint: str | None = None
        self.connected_since: float | None = None
        self.settings: dict[str, Any] = {item["key"]: item["default"] for item in SCHEMA}
        self.forbidden: set[str] = set()  # commands answered as if the caller were no operator
        self.up_error: str | None = None  # a reason to refuse "up" with, as a wrong token is
        # doctor: how long braidd takes (it answers within about 7 s) and links whose UDP
        # to the server is blocked; the report is made by braidd's own diagnose().
        self.doctor_delay = 1.0
        self.speed_step = 0.05  # seconds between a speed test's progress lines
        self.udp_blocked: set[str] = set()
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._subscribers: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._sampling = threading.Event()

    # -- life -------------------------------------------------------------------

    def start(self) -> FakeBraidd:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        listener.listen(16)
        self._listener = listener
        thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Close everything, as a daemon that exits does; the path is removed."""
        self._sampling.set()
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            connections, self._connections = self._connections, []
            self._subscribers = []
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        for thread in list(self._threads):
            thread.join(timeout=5)
        self._threads = []
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> FakeBraidd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subscribers)

    def commands(self, *names: str) -> list[dict[str, Any]]:
        """The requests received so far, optionally only those with these commands."""
        with self._lock:
            return [r for r in self.requests if not names or r["cmd"] in names]

    def changes(self) -> list[dict[str, Any]]:
        return self.commands(*sorted(CHANGES))

    # -- pushing ----------------------------------------------------------------

    def push(self, message: dict[str, Any]) -> None:
        line = control.encode(message)
        with self._lock:
            subscribers = list(self._subscribers)
        for conn in subscribers:
            with contextlib.suppress(OSError):
                conn.sendall(line)

    def push_event(self, kind: str, link: str | None, message: str, **extra: Any) -> None:
        self.push({"event": kind, "t": time.time(), "link": link, "message": message, **extra})

    def push_sample(self, rates: dict[str, tuple[float, float]] | None = None) -> None:
        """One sample; ``rates`` maps a link name to (rx, tx) bits per second."""
        with self._lock:
            for link in self.links:
                rx, tx = (rates or {}).get(link["name"], (0.0, 0.0))
                link["rx_bps"], link["tx_bps"] = round(rx), round(tx)
                link["used_bytes"] += int((rx + tx) / 8)
            sample = {"event": "sample", **self.status(brief=True)}
        self.push(sample)

    def keep_sampling(self, rates: dict[str, tuple[float, float]], interval: float = 1.0) -> None:
        """Push a sample every ``interval`` seconds until stop(), as braidd does at 1 Hz.

        A tray that hears nothing for a few seconds takes the daemon for hung.
        """
        self._sampling.clear()

        def run() -> None:
            while not self._sampling.wait(interval):
                self.push_sample(rates)

        thread = threading.Thread(target=run, name="fake-braidd-samples", daemon=True)
        thread.start()
        self._threads.append(thread)

    # -- state ------------------------------------------------------------------

    def status(self, brief: bool = False) -> dict[str, Any]:
        links = sorted(copy.deepcopy(self.links), key=lambda link: link["order"])
        out: dict[str, Any] = {
            "state": self.state,
            "t": time.time(),
            "server": self.server,
            "fingerprint": self.fingerprint,
            "error": self.error,
            "connected_since": self.connected_since,
            "socks": "127.0.0.1:1080",
            "best_link": links[0]["name"] if links and self.state != "disconnected" else None,
            "mode": self.settings.get("mode", "proxy"),
            "capture": {
                "active": False,
                "in_force": "off",
                "when_server_unreachable": "direct",
                "prefer_tcp_for_web": True,
                "udp_sessions": 0,
                "dns_queries": 0,
                "dns_failures": 0,
            },
            "links": links,
            "tunnel": {
                "pool_ready": 4 if self.state == "connected" else 0,
                "flows_active": 0,
                "flows_total": 0,
                "flows_failed": 0,
                "bytes_up": 0,
                "bytes_down": 0,
                "rx_bps": sum(link["rx_bps"] for link in links if link["carrying"]),
                "tx_bps": sum(link["tx_bps"] for link in links if link["carrying"]),
                "paths": {"per_flow": True, "flows": 0, "spread": 0, "joins": 0},
            },
            "datagram": {
                "session": self.state == "connected",
                "error": None,
                "links": [],
                "flows": [],
                **dict.fromkeys(
                    ("sent", "copies", "received", "duplicates", "replayed", "forged"), 0
                ),
                "too_large": 0,
                "sessions": 0,
                "held": {},
            },
        }
        if not brief:
            out["events"] = []
            out["problems"] = []
        return out

    # -- serving ----------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self._connections.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        try:
            for line in reader:
                if not line.strip():
                    continue
                answer = self._dispatch(conn, line)
                if answer:  # None: answered later, from another thread (doctor)
                    conn.sendall(answer)
        except OSError:
            pass
        finally:
            with self._lock:
                if conn in self._subscribers:
                    self._subscribers.remove(conn)
            reader.close()

    def _dispatch(self, conn: socket.socket, line: bytes) -> bytes:
        request_id = None
        try:
            request = control.decode_request(line)
            request_id = request.get("id")
            with self._lock:
                self.requests.append({k: v for k, v in request.items() if k != "v"})
            cmd = request["cmd"]
            if cmd in self.forbidden:
                raise ControlError(
                    ErrorCode.FORBIDDEN,
                    f"only root and members of the 'braid' group may {cmd}; "
                    "ask an administrator to run: usermod -aG braid <you> (then log in again)",
                )
            handler = getattr(self, "_cmd_" + cmd.replace("-", "_"), None)
            if handler is None:
                raise ControlError(ErrorCode.UNKNOWN_COMMAND, f"unknown command {cmd!r}")
            result = handler(conn, request)
            if result is _LATER:
                return None
            return control.ok(request_id, result)
        except ControlError as exc:
            return control.error(request_id, exc.code, exc.message)

    def _cmd_doctor(self, conn: socket.socket, request: dict) -> object:
        """Answered after ``doctor_delay``, as braidd's checks take seconds; other requests go on."""
        request_id = request.get("id")

        def answer() -> None:
            with contextlib.suppress(OSError):
                conn.sendall(control.ok(request_id, self.doctor_report()))

        timer = threading.Timer(self.doctor_delay, answer)
        timer.daemon = True
        timer.start()
        return _LATER

    def _cmd_speed_test(self, conn: socket.socket, request: dict) -> object:
        """As braidd does: progress lines, a step per link and direction, then the answer."""
        request_id = request.get("id")
        with self._lock:
            # Each link's figure: 20, 12, 6 Mbit/s ... by its place.
            links = [
                (link["name"], link["kind"], 20.0 / (1 + i)) for i, link in enumerate(self.links)
            ]

        def run() -> None:
            steps = 2 * (len(links) + 1)
            results = []
            with contextlib.suppress(OSError):
                for step, (name, direction) in enumerate(
                    [(n, d) for n, _, _ in links for d in ("down", "up")]
                    + [("bonded", "down"), ("bonded", "up")],
                    1,
                ):
                    news = {
                        "step": step,
                        "steps": steps,
                        "link": name,
                        "direction": direction,
                        "mbps": None,
                        "elapsed": step * 0.05,
                        "time_limit": 30,
                    }
                    conn.sendall(control.progress(request_id, news))
                    time.sleep(self.speed_step)
                for name, kind, rate in links:
                    results.append(
                        {
                            "name": name,
                            "kind": kind,
                            "down_mbps": rate * 0.94,
                            "up_mbps": rate * 0.93,
                            "down_bytes": 1,
                            "up_bytes": 1,
                            "error": None,
                            "skipped": None,
                            "rtt_idle_ms": 11.0,
                            "rtt_down_ms": 30.0,
                            "rtt_up_ms": 31.0,
                        }
                    )
                total = sum(rate for _, _, rate in links)
                bonded = {
                    "name": "bonded",
                    "kind": "bonded",
                    "down_mbps": total * 0.9,
                    "up_mbps": total * 0.88,
                    "down_bytes": 1,
                    "up_bytes": 1,
                    "error": None,
                    "skipped": None,
                    "rtt_idle_ms": None,
                    "rtt_down_ms": None,
                    "rtt_up_ms": None,
                    "links": [name for name, _, _ in links],
                }
                conn.sendall(control.ok(request_id, {
                    "server": self.server or "198.18.20.2:7443", "seconds": 2.4,
                    "time_limit": 30, "links": results, "bonded": bonded,
                    "elapsed_s": 24.0, "bytes": 46_000_000}))  # fmt: skip

        threading.Thread(target=run, daemon=True).start()
        return _LATER

    def doctor_report(self) -> dict[str, Any]:
        from braid.daemon.doctor import LinkObservation, Observations, diagnose

        with self._lock:
            connected = self.state == "connected"
            seen = [
                LinkObservation(
                    name=link["name"],
                    kind=link["kind"],
                    priority=link["effective_priority"],
                    address=link["addresses"][0],
                    default_route=link["order"] == 0,
                    routed=True,
                    tcp="ok",
                    connect_ms=link["rtt_ms"],
                    mptcp=True,
                    join=True,
                    probed=connected,
                    udp_alive=link["name"] not in self.udp_blocked,
                    rtt_ms=link["rtt_ms"] if connected else None,
                    jitter_ms=link["jitter_ms"],
                    loss=link["loss"],
                    subflows=1,
                    spread_tunnels=1,
                    rp_filter=2,
                )
                for link in self.links
            ]
            server = self.server or (self.saved[0] if self.saved else None)
        observations = Observations(
            server=server,
            connected=connected,
            links=seen,
            limits={"subflows": 8, "add_addr_accepted": 8},
            counters={"MPCapableSYNTX": 12, "MPCapableSYNACKRX": 12, "MPJoinSynTx": 24},
            counters_since="braidd started",
        )
        return diagnose(observations, port=7443)

    def _cmd_status(self, conn: socket.socket, request: dict) -> dict:
        with self._lock:
            return self.status()

    def _cmd_subscribe(self, conn: socket.socket, request: dict) -> dict:
        with self._lock:
            self._subscribers.append(conn)
            return {"interval": 1.0, "status": self.status()}

    def _cmd_links(self, conn: socket.socket, request: dict) -> list:
        with self._lock:
            return self.status()["links"]

    def _cmd_up(self, conn: socket.socket, request: dict) -> dict:
        uri = request.get("pairing")
        if uri:
            try:
                pairing = parse_pairing(uri)
            except PairingError as exc:
                raise ControlError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
            server, fingerprint = pairing.server, pairing.fingerprint
        elif self.saved is None:
            raise ControlError(ErrorCode.INVALID_ARGUMENT, "Braid is not paired with a server yet")
        else:
            server, fingerprint = self.saved
        if self.up_error:
            raise ControlError(ErrorCode.FAILED, self.up_error)
        with self._lock:
            self.saved = (server, fingerprint)
            self.state, self.server, self.fingerprint = "connected", server, fingerprint
            self.connected_since = time.time()
            status = self.status()
        self.push_event("connected", None, f"connected to {server}")
        return status

    def _cmd_test_pairing(self, conn: socket.socket, request: dict) -> dict:
        """As braidd: one tunnel opened and closed, nothing saved or switched."""
        uri = request.get("pairing")
        if not uri:
            raise ControlError(ErrorCode.INVALID_ARGUMENT, "give the pairing to test")
        try:
            pairing = parse_pairing(uri)
        except PairingError as exc:
            raise ControlError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
        if self.up_error:
            raise ControlError(ErrorCode.FAILED, self.up_error)
        return {
            "server": pairing.server,
            "address": [pairing.host],
            "elapsed_ms": 21.0,
            "link": "eth0",
        }

    def _cmd_down(self, conn: socket.socket, request: dict) -> dict:
        with self._lock:
            self.state, self.connected_since = "disconnected", None
            self.server = self.fingerprint = None
            status = self.status()
        self.push_event("disconnected", None, "disconnected")
        return status

    def _link(self, name: Any) -> dict:
        for link in self.links:
            if link["name"] == name:
                return link
        raise ControlError(ErrorCode.INVALID_ARGUMENT, f"no link {name!r}")

    def _cmd_set_link(self, conn: socket.socket, request: dict) -> dict:
        with self._lock:
            link = self._link(request.get("link"))
            for key in ("priority", "metered", "cap", "order", "kind"):
                if key in request:
                    link[key] = request[key]
            if "priority" in request:
                link["effective_priority"] = request["priority"]
            return copy.deepcopy(link)

    def _cmd_interfaces(self, conn: socket.socket, request: dict) -> list:
        with self._lock:
            links = [
                {"name": x["name"], "kind": x["kind"], "link": True, "reason": ""}
                for x in self.links
            ]
            others = [{"name": n, "kind": k, "link": False, "reason": r} for n, k, r in self.others]
            return links + others

    def _cmd_add_link(self, conn: socket.socket, request: dict) -> dict:
        name = request.get("link")
        with self._lock:
            found = next((other for other in self.others if other[0] == name), None)
            if found is None:
                raise ControlError(ErrorCode.INVALID_ARGUMENT, f"no interface {name!r}")
            self.others.remove(found)
            kind = request.get("kind") or "other"
            link = make_link(
                found[0], kind, len(self.links), "backup" if kind == "cellular" else "always"
            )
            link["added"] = True
            self.links.append(link)
            return copy.deepcopy(link)

    def _cmd_remove_link(self, conn: socket.socket, request: dict) -> list:
        with self._lock:
            link = self._link(request.get("link"))
            if not link["added"]:
                raise ControlError(ErrorCode.INVALID_ARGUMENT, f"{link['name']} was not added")
            self.links.remove(link)
            self.others.append((link["name"], link["kind"], "virtual device"))
            return self.status()["links"]

    def _cmd_set_order(self, conn: socket.socket, request: dict) -> list:
        names = request.get("links")
        with self._lock:
            if not isinstance(names, list) or sorted(names) != sorted(
                x["name"] for x in self.links
            ):
                raise ControlError(ErrorCode.INVALID_ARGUMENT, "links must list every link once")
            for order, name in enumerate(names):
                self._link(name)["order"] = order
            return self.status()["links"]

    def _cmd_get_settings(self, conn: socket.socket, request: dict) -> dict:
        with self._lock:
            return {"values": dict(self.settings), "schema": copy.deepcopy(SCHEMA)}

    def _cmd_set_settings(self, conn: socket.socket, request: dict) -> dict:
        changes = request.get("settings")
        if not isinstance(changes, dict):
            raise ControlError(ErrorCode.INVALID_ARGUMENT, "settings must be an object")
        with self._lock:
            for key, value in changes.items():
                if key not in self.settings:
                    raise ControlError(ErrorCode.INVALID_ARGUMENT, f"unknown setting {key!r}")
                self.settings[key] = value
            return dict(self.settings)
