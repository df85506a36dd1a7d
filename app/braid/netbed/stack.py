"""Braid running in a test world: braid-server in the server namespace, braidd on the laptop.

Used by the demo, the tests and the benchmarks, so all three run the real
programs as separate processes, exactly as a user would.
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


def run_traffic(world, *args: str, timeout: float = 120) -> dict:
    """Run the traffic client (braid.netbed.traffic) in the laptop namespace; its JSON result."""
    done = world.run(
        "laptop",
        [sys.executable, "-m", "braid.netbed.traffic", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
    if not done.stdout.strip():
        raise RuntimeError(f"the traffic client printed nothing: {done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class BraidStack:
    """Starts braid-server and braidd inside ``world`` and pairs them."""

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
        self.pairing_uri: str | None = None
        self.server: subprocess.Popen | None = None
        self.daemon: subprocess.Popen | None = None

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
        argv = [
            sys.executable,
            "-m",
            "braid.cli",
            "--control",
            str(self.control_path),
            "daemon",
            "--state-dir",
            str(self.daemon_dir),
            "--socks",
            f"{self.socks[0]}:{self.socks[1]}",
        ]
        for link in self.links:
            argv += ["--link", link]
        self.daemon = self.world.popen(
            "laptop",
            argv,
            stdout=open(self.daemon_log, "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise RuntimeError(f"braidd exited early:\n{self.daemon_log.read_text()}")
            try:
                self.call("status")
                return
            except (DaemonUnavailable, OSError):
                time.sleep(0.1)
        raise TimeoutError(f"braidd did not start:\n{self.daemon_log.read_text()}")

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
        if self.daemon is None or self.daemon.poll() is not None:
            return None if self.daemon is None else self.daemon.returncode
        self.daemon.send_signal(sig)
        try:
            return self.daemon.wait(timeout)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            return self.daemon.wait()

    def stop(self) -> None:
        self.stop_daemon()
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.server.wait(10)

    def logs(self) -> str:
        parts = []
        for path in (self.daemon_log, self.server_log):
            with contextlib.suppress(OSError):
                parts.append(f"--- {path.name} ---\n{path.read_text()[-6000:]}")
        return "\n".join(parts)

    def __enter__(self) -> BraidStack:
        try:
            return self.start()
        except BaseException:
            print(self.logs(), file=sys.stderr)  # why it did not start
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
