"""Real displays for the real tray: Xvfb or a headless Weston, a private session bus, screenshots.

``Desktop`` starts the display server (``x11``: Xvfb; ``wayland``: Weston's headless
backend with its pixman renderer, so it draws, and ``--debug`` so its screenshooter is
allowed), then runs ``python -m braid.gui.app`` on it with the session bus it is given,
and asks the running tray for its state as a second start does (``--dump``). Everything
it started is ended by ``stop()``, also after a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

OUTPUT = Path(__file__).resolve().parents[2] / "test-output" / "gui"
SCREEN = (1280, 800)
TOOLS = {
    "x11": {"Xvfb": "xvfb", "import": "imagemagick", "dbus-daemon": "dbus-daemon"},
    "wayland": {
        "weston": "weston",
        "weston-screenshooter": "weston",
        "dbus-daemon": "dbus-daemon",
    },
}


def require_tools(kind: str) -> None:
    """Missing programs fail the test as root (CI installs them: ./dev setup), else skip."""
    missing = {tool: package for tool, package in TOOLS[kind].items() if not shutil.which(tool)}
    if not missing:
        return
    packages = " ".join(sorted(set(missing.values())))
    reason = f"missing {', '.join(missing)} (Debian: {packages}; ./dev setup installs them)"
    if os.geteuid() == 0:
        pytest.fail(reason)
    pytest.skip(reason)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class Desktop:
    def __init__(self, kind: str, control: Path, bus_address: str | None, name: str) -> None:
        self.kind = kind
        self.control = control
        self.name = name
        self.home = Path(tempfile.mkdtemp(prefix="braid-desk-"))  # short: socket paths
        self.home.chmod(0o700)
        self.env = {
            **os.environ,
            "HOME": str(self.home),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
            "XDG_RUNTIME_DIR": str(self.home),
        }
        if bus_address is not None:  # else the session's own bus, if any
            self.env["DBUS_SESSION_BUS_ADDRESS"] = bus_address
        for variable in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORMTHEME"):
            self.env.pop(variable, None)
        OUTPUT.mkdir(parents=True, exist_ok=True)
        self.log = OUTPUT / f"{name}.log"
        self.processes: list[subprocess.Popen] = []
        self.tray: subprocess.Popen | None = None

    # -- life -------------------------------------------------------------------------

    def start(self) -> Desktop:
        width, height = SCREEN
        if self.kind == "x11":
            display = next(
                f":{n}" for n in range(70, 100) if not Path(f"/tmp/.X11-unix/X{n}").exists()
            )
            self._spawn(
                ["Xvfb", display, "-screen", "0", f"{width}x{height}x24", "-nolisten", "tcp"]
            )
            wait_for(Path(f"/tmp/.X11-unix/X{display[1:]}").exists, 10, "Xvfb")
            self.env.update(DISPLAY=display, QT_QPA_PLATFORM="xcb")
        else:
            self._spawn(
                [
                    "weston",
                    "--backend=headless-backend.so",
                    "--use-pixman",  # the default headless renderer draws nothing
                    f"--width={width}",
                    f"--height={height}",
                    "--socket=wayland-braid",
                    "--idle-time=0",  # no screen lock in the middle of a test
                    "--debug",  # lets weston-screenshooter take pictures
                ],
                stdout=open(OUTPUT / f"{self.name}-weston.log", "w"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
            )
            wait_for((self.home / "wayland-braid").exists, 15, "weston's socket")
            self.env.update(WAYLAND_DISPLAY="wayland-braid", QT_QPA_PLATFORM="wayland")
        self.furnish()
        self.tray = self._spawn(
            [sys.executable, "-m", "braid.gui.app", "--control", str(self.control)],
            stdout=open(self.log, "w"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
        )
        return self

    def furnish(self) -> None:
        """What goes on the display before the tray starts (a subclass's panel); nothing here."""

    def _spawn(self, argv: list[str], **kwargs) -> subprocess.Popen:
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, env=self.env, cwd=self.home, **kwargs)
        self.processes.append(proc)
        return proc

    def stop(self) -> int | None:
        """End the tray (its exit code is returned), then the display server."""
        code = None
        if self.tray is not None and self.tray.poll() is None:
            self.tray.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.tray.wait(10)
        elif self.tray is not None:
            code = self.tray.returncode
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(self.home, ignore_errors=True)
        return code

    def __enter__(self) -> Desktop:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- asking the running tray --------------------------------------------------------

    def ask(self, *args: str) -> None:
        """A second start of the tray: it hands the request to the running one."""
        subprocess.run(
            [sys.executable, "-m", "braid.gui.app", *args],
            env={**self.env, "QT_QPA_PLATFORM": "offscreen"},
            check=True,
            timeout=20,
            capture_output=True,
        )

    def state(self) -> dict:
        path = self.home / "state.json"
        self.ask("--dump", str(path))
        return json.loads(path.read_text())

    def logged(self, text: str) -> bool:
        return text in self.log.read_text()

    def screenshot(self, name: str, crop: str | None = None) -> Path:
        """A picture of the whole screen (X11: or of ``crop``, WxH+X+Y), taken by the display
        server's side."""
        path = OUTPUT / f"{name}.png"
        if self.kind == "x11":
            argv = ["import", "-window", "root", *(["-crop", crop, "+repage"] if crop else [])]
            subprocess.run([*argv, str(path)], env=self.env, check=True, timeout=30)
            return path
        shots = self.home / "shots"
        shots.mkdir(exist_ok=True)
        subprocess.run(["weston-screenshooter"], env=self.env, cwd=shots, check=True, timeout=30)
        taken = wait_for(lambda: sorted(shots.glob("*.png")), 10, "weston's screenshot")
        shutil.move(taken[-1], path)
        for leftover in shots.glob("*.png"):
            leftover.unlink()
        return path
