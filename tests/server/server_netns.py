"""Helpers for braid-server tests: a throwaway network namespace, a client loop inside it,
and braid-server running there as a real process.

Nothing here changes the namespace the tests run in: every ``ip`` command
names the test namespace, the server runs under ``ip netns exec``, and test
client code runs in a thread of ours that entered the namespace with setns().
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import braid
from braid.protocol.pairing import Pairing, parse_pairing
from braid.server.cli import main as server_main

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
APP_DIR = Path(braid.__file__).resolve().parents[1]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


class Netns:
    """A named namespace (``ip netns``) with lo up; ``delete`` also removes /etc/netns/NAME."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.etc = Path("/etc/netns") / name

    def create(self) -> None:
        ip("netns", "add", self.name)
        self.ip("link", "set", "lo", "up")

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return ip("-n", self.name, *args, check=check)

    def veth(self, v4: tuple[str, ...] = (), v6: tuple[str, ...] = ()) -> None:
        """A veth pair brd0/brd1, both up, with ``v4`` (/24) and ``v6`` (/64, no DAD) on brd0:
        every address is local, so a server and its clients and targets reach each other."""
        self.ip("link", "add", "brd0", "type", "veth", "peer", "name", "brd1")
        for dev in ("brd0", "brd1"):
            self.ip("link", "set", dev, "up")
        for addr in v4:
            self.ip("addr", "add", f"{addr}/24", "dev", "brd0")
        for addr in v6:
            self.ip("addr", "add", f"{addr}/64", "dev", "brd0", "nodad")

    def exec_argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def write_etc(self, filename: str, text: str) -> None:
        """A file that ``ip netns exec`` mounts over /etc/FILENAME for processes it starts."""
        self.etc.mkdir(parents=True, exist_ok=True)
        (self.etc / filename).write_text(text)

    def delete(self) -> None:
        ip("netns", "delete", self.name, check=False)
        shutil.rmtree(self.etc, ignore_errors=True)


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


class NetnsLoop:
    """An asyncio loop in a thread that entered the namespace.

    setns() moves only the calling thread, and threads it starts (the loop's
    resolver executor) inherit the namespace; the rest of pytest stays put.
    """

    def __init__(self, netns: Netns) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._main, args=(f"/run/netns/{netns.name}",), daemon=True
        )
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error

    def _main(self, path: str) -> None:
        try:
            _setns(path)
        except OSError as exc:
            self._error = exc
            self._ready.set()
            return
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


def _cli(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert server_main(argv) == 0
    return out.getvalue()


def new_token(state_dir: Path) -> Pairing:
    """``braid-server init --new-token``: the pairing with the new token."""
    out = _cli(["init", "--state-dir", str(state_dir), "--new-token"])
    return parse_pairing(out.strip().splitlines()[-1])


def init_state(
    state_dir: Path, listen: str, public_host: str | None = None, **settings: Any
) -> Pairing:
    """``braid-server init`` in this process (it touches no network), then adjust server.json."""
    argv = ["init", "--state-dir", str(state_dir), "--listen", listen]
    if public_host:
        argv += ["--public-host", public_host]
    pairing = parse_pairing(_cli(argv).strip().splitlines()[-1])
    if settings:
        path = state_dir / "server.json"
        config = json.loads(path.read_text())
        for key, value in settings.items():
            config[key] = value
        path.write_text(json.dumps(config))
    return pairing


class ServerProcess:
    """``braid-server run`` inside a namespace, its stderr in a log file."""

    def __init__(self, netns: Netns, state_dir: Path, log_path: Path) -> None:
        self.netns = netns
        self.state_dir = state_dir
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def argv(self, *extra: str) -> list[str]:
        command = [sys.executable, "-m", "braid.server", "run", "--state-dir", str(self.state_dir)]
        return self.netns.exec_argv([*command, *extra])

    @staticmethod
    def env() -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(APP_DIR), env.get("PYTHONPATH")]))
        return env

    def start(self, timeout: float = 15) -> ServerProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv("-v"), stdout=log, stderr=subprocess.STDOUT, env=self.env()
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "listening on" in self.log():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"braid-server exited early:\n{self.log()}")
            time.sleep(0.05)
        raise TimeoutError(f"braid-server did not start:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    def wait_for_log(self, text: str, timeout: float = 5) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the server log:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
