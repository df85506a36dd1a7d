"""Braid running in a test world: braid-server in the server namespace, braidd on the laptop.

Used by the demo, the tests and the benchmarks, so all three run the real
programs as separate processes, exactly as a user would.

In a world with several laptops (``World(..., laptops=3)``) the other laptops get their own
braidd paired with the same server::

    with BraidStack(world) as stack:                  # braid-server, and braidd in "laptop"
        second = stack.add_laptop("laptop-2").start()  # braidd in "laptop-2", paired
        run_traffic(world, "download", world.target_v4, "--socks", "127.0.0.1:1080",
                    role="laptop-2")
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

from braid.client import ControlClient, DaemonUnavailable

log = logging.getLogger(__name__)

SERVER_PORT = 7443
SOCKS_PORT = 1080


def wait_for(predicate, timeout: float, interval: float = 0.1):
    """Call ``predicate`` every ``interval`` seconds until it returns something true or ``timeout``
    seconds have passed; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def run_traffic(world, *args: str, timeout: float = 120, role: str = "laptop") -> dict:
    """Run the traffic client (braid.netbed.traffic) in the namespace of ``role`` (default: the
    laptop); its JSON result."""
    done = world.run(
        role,
        [sys.executable, "-m", "braid.netbed.traffic", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
    if not done.stdout.strip():
        raise RuntimeError(f"the traffic client printed nothing: {done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_load(
    world,
    socks: str,
    connections: int,
    max_bytes: int = 200_000,
    timeout: float = 120,
    seed: str | int = 0,
    role: str = "laptop",
) -> dict:
    """``connections`` concurrent downloads through ``socks`` (braid.netbed.load) from the
    namespace of ``role``; its JSON report, or ``{"error": ...}`` if it printed none. A client
    gives up after ``timeout`` seconds."""
    done = world.run(
        role,
        [
            sys.executable,
            "-m",
            "braid.netbed.load",
            "--socks",
            socks,
            "--host",
            world.target_v4,
            "--connections",
            str(connections),
            "--max-bytes",
            str(max_bytes),
            "--timeout",
            str(timeout),
            "--seed",
            str(seed),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout + 120,
    )
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"the load client printed no report: {done.stderr[-2000:]}"}


def start_traffic(world, *args: str, role: str = "laptop") -> subprocess.Popen:
    """Start the traffic client in the namespace of ``role``; read its JSON lines from stdout
    (progress ticks with ``--progress``, then the result)."""
    return world.popen(
        role,
        [sys.executable, "-m", "braid.netbed.traffic", *args],
        stdout=subprocess.PIPE,
        text=True,
    )


def _braidd_argv(
    control_path: Path, state_dir: Path, socks: tuple[str, int], links: list[str], cgroup: str
) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "braid.cli",
        "--control",
        str(control_path),
        "daemon",
        "--state-dir",
        str(state_dir),
        "--socks",
        f"{socks[0]}:{socks[1]}",
        "--cgroup",
        cgroup,  # each daemon of the world has cgroups of its own, named like its namespace
    ]
    for link in links:
        argv += ["--link", link]
    return argv


def _wait_for_daemon(proc: subprocess.Popen, control_path: Path, log_path: Path) -> None:
    """Wait until braidd answers on its control socket."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"braidd exited early:\n{log_path.read_text()}")
        try:
            with ControlClient(str(control_path), timeout=30) as client:
                client.call("status")
            return
        except (DaemonUnavailable, OSError):
            time.sleep(0.1)
    raise TimeoutError(f"braidd did not start:\n{log_path.read_text()}")


def _stop_daemon(proc: subprocess.Popen | None, sig: int, timeout: float) -> int | None:
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


class Braidd:
    """braidd in another laptop namespace, paired with a :class:`BraidStack`'s server.

    Made by :meth:`BraidStack.add_laptop`. It has its own control socket, state directory and
    log in the world's workdir (``control-<role>.sock``, ``daemon-state-<role>``,
    ``braidd-<role>.log``); its SOCKS port is on the loopback of its own namespace, so every
    laptop can use the same port.
    """

    def __init__(
        self,
        stack: BraidStack,
        role: str,
        links: list[str] | None = None,
        socks_port: int = SOCKS_PORT,
    ) -> None:
        self.stack = stack
        self.world = stack.world
        self.world.ns(role)  # KeyError for a role not in this world
        self.role = role
        self.links = list(links or stack.links)
        self.socks = ("127.0.0.1", socks_port)
        base = Path(self.world.workdir)
        self.state_dir = base / f"daemon-state-{role}"
        self.control_path = base / f"control-{role}.sock"
        self.log = base / f"braidd-{role}.log"
        self.daemon: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"<Braidd in {self.role} {self.control_path.name}>"

    def start_daemon(self) -> None:
        self.daemon = self.world.popen(
            self.role,
            _braidd_argv(
                self.control_path, self.state_dir, self.socks, self.links, self.world.ns(self.role)
            ),
            stdout=open(self.log, "ab"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
        )
        _wait_for_daemon(self.daemon, self.control_path, self.log)

    def start(self) -> Braidd:
        """Start braidd and pair it with the stack's server."""
        self.start_daemon()
        self.up()
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        """Stop braidd; its exit status (None if it never ran)."""
        return _stop_daemon(self.daemon, sig, timeout)

    def call(self, cmd: str, **args):
        with ControlClient(str(self.control_path), timeout=30) as client:
            return client.call(cmd, **args)

    def up(self, uri: str | None = None) -> dict:
        return self.call("up", pairing=uri or self.stack.pairing_uri)

    def status(self) -> dict:
        return self.call("status")

    def logs(self, tail: int = 6000) -> str:
        with contextlib.suppress(OSError):
            return f"--- {self.log.name} ---\n{self.log.read_text()[-tail:]}"
        return ""


class BraidStack:
    """Starts braid-server and braidd inside ``world`` and pairs them.

    :meth:`add_laptop` adds a braidd in another laptop namespace, paired with the same server.
    """

    def __init__(
        self,
        world,
        links: list[str] | None = None,
        socks_port: int = SOCKS_PORT,
        server_port: int = SERVER_PORT,
        public_host: str | None = None,
    ) -> None:
        self.world = world
        self.links = links or [f"{spec.name}:{spec.kind}:always" for spec in world.links]
        self.socks = ("127.0.0.1", socks_port)
        self.server_port = server_port
        self.public_host = public_host or world.server_v4
        base = Path(world.workdir)
        self.server_dir = base / "server-state"
        self.daemon_dir = base / "daemon-state"
        self.control_path = base / "control.sock"
        self.server_log = base / "braid-server.log"
        self.daemon_log = base / "braidd.log"
        #: The name of braidd's cgroups for ``braid direct`` and ``braid bonded``.
        self.cgroup = world.ns("laptop")
        self.pairing_uri: str | None = None
        self.server: subprocess.Popen | None = None
        self.daemon: subprocess.Popen | None = None
        #: The daemons of the other laptops (:meth:`add_laptop`).
        self.laptops: list[Braidd] = []

    # -- processes -------------------------------------------------------------

    def init_server(self) -> str:
        result = self.world.run(
            "server",
            [
                sys.executable,
                "-m",
                "braid.server.cli",
                "init",
                "--state-dir",
                str(self.server_dir),
                "--listen",
                f"[::]:{self.server_port}",
                "--public-host",
                self.public_host,
            ],
            capture_output=True,
            text=True,
        )
        self.pairing_uri = result.stdout.strip().splitlines()[-1]
        return self.pairing_uri

    def start_server(self) -> None:
        if self.pairing_uri is None:
            self.init_server()
        offset = self.server_log.stat().st_size if self.server_log.exists() else 0
        self.server = self.world.popen(
            "server",
            [sys.executable, "-m", "braid.server.cli", "run", "--state-dir", str(self.server_dir)],
            stdout=open(self.server_log, "ab"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
        )
        self._wait_for_server(offset)

    def start_daemon(self) -> None:
        self.daemon = self.world.popen(
            "laptop",
            _braidd_argv(self.control_path, self.daemon_dir, self.socks, self.links, self.cgroup),
            stdout=open(self.daemon_log, "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        _wait_for_daemon(self.daemon, self.control_path, self.daemon_log)

    def add_laptop(
        self, role: str, links: list[str] | None = None, socks_port: int = SOCKS_PORT
    ) -> Braidd:
        """A braidd for the laptop namespace ``role`` (e.g. ``laptop-2``), not started yet: call
        its ``start()``. ``links`` defaults to this stack's. :meth:`stop` stops it too."""
        if role == "laptop" or any(other.role == role for other in self.laptops):
            raise ValueError(f"{role} has a braidd already")
        daemon = Braidd(self, role, links, socks_port)
        self.laptops.append(daemon)
        return daemon

    def _wait_for_server(self, offset: int) -> None:
        """Wait for the server's "listening on" line (a probe connection would log as an attack)."""
        assert self.server is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise RuntimeError(f"braid-server exited early:\n{self.server_log.read_text()}")
            if b"listening on" in self.server_log.read_bytes()[offset:]:
                return
            time.sleep(0.05)
        raise TimeoutError(f"braid-server did not start:\n{self.server_log.read_text()}")

    # -- control ---------------------------------------------------------------

    def call(self, cmd: str, **args):
        with ControlClient(str(self.control_path), timeout=30) as client:
            return client.call(cmd, **args)

    def up(self, uri: str | None = None) -> dict:
        return self.call("up", pairing=uri or self.pairing_uri)

    def status(self) -> dict:
        return self.call("status")

    def start(self) -> BraidStack:
        self.start_server()
        self.start_daemon()
        self.up()
        return self

    def stop_daemon(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        return _stop_daemon(self.daemon, sig, timeout)

    def cleanup_daemon(self, state_dir: Path | None = None) -> subprocess.CompletedProcess:
        """``braid daemon --cleanup``: what a user runs after braidd crashed."""
        return self.world.run(
            "laptop",
            [
                sys.executable,
                "-m",
                "braid.cli",
                "daemon",
                "--cleanup",
                "--state-dir",
                str(state_dir or self.daemon_dir),
                "--cgroup",
                self.cgroup,
            ],
            capture_output=True,
            text=True,
            check=False,
        )

    def stop(self) -> None:
        for other in self.laptops:
            other.stop()
        self.stop_daemon()
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.server.wait(10)

    def logs(self, tail: int = 6000) -> str:
        """The last ``tail`` characters of each daemon's and the server's log."""
        parts = []
        for path in (self.daemon_log, *(other.log for other in self.laptops), self.server_log):
            with contextlib.suppress(OSError):
                parts.append(f"--- {path.name} ---\n{path.read_text()[-tail:]}")
        return "\n".join(parts)

    def __enter__(self) -> BraidStack:
        try:
            return self.start()
        except BaseException:
            print(self.logs(), file=sys.stderr)  # why it did not start
            self.stop()
            raise

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not issubclass(exc_type, GeneratorExit):
            print(self.logs(), file=sys.stderr)  # why the block failed, seen from the processes
        self.stop()
