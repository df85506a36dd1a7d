"""A Debian 12 booted with systemd-nspawn, for the package tests: its root is made once with
debootstrap and kept in test-output/ (reruns copy it), it boots with a network namespace of
its own, and commands run inside with nsenter. Nothing here touches the host's network."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from package_build import ROOT

SUITE = "bookworm"
# A minimal booted Debian, and curl for downloads through Braid inside it. The container has no
# way out, so the packages' dependencies are added too (base_root's ``extra``).
BASE_PACKAGES = [
    "systemd",
    "systemd-sysv",
    "dbus",
    "iproute2",
    "nftables",
    "adduser",
    "procps",
    "curl",
]
CACHE = ROOT / "test-output" / "booted"
DEBOOTSTRAP_TIMEOUT = 900
BOOT_TIMEOUT = 60
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def unavailable() -> str | None:
    """Why a Debian cannot be booted here."""
    if os.geteuid() != 0:
        return "needs root to debootstrap and boot a Debian with systemd-nspawn (sudo ./dev test)"
    for tool, package in (
        ("debootstrap", "debootstrap"),
        ("systemd-nspawn", "systemd-container"),
        ("nsenter", "util-linux"),
    ):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: apt install {package}; ./dev setup does)"
    return None


def base_root(extra: list[str], flavour: str = "minbase") -> tuple[Path, float | None]:
    """The cached debootstrapped root with BASE_PACKAGES and ``extra``, made now if missing or
    made with other packages; and the seconds debootstrap took (None: it was cached). Each
    ``flavour`` (the package tests', NetworkManager's) has a cache of its own."""
    include = ",".join(sorted(set(BASE_PACKAGES) | set(extra)))
    base = CACHE / f"{SUITE}-{flavour}"
    stamp = base / ".braid-include"
    if stamp.is_file() and stamp.read_text() == include:
        return base, None
    shutil.rmtree(base, ignore_errors=True)
    partial = CACHE / f"{SUITE}-{flavour}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    done = subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={include}", SUITE, str(partial)],
        capture_output=True,
        text=True,
        timeout=DEBOOTSTRAP_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise RuntimeError(f"debootstrap failed:\n{(done.stdout + done.stderr)[-4000:]}")
    (partial / ".braid-include").write_text(include)
    partial.rename(base)
    return base, time.monotonic() - started


def fresh_copy(base: Path, name: str = "") -> Path:
    """A copy of the cached root to boot and change (the cache stays as debootstrap made it),
    ``root-<pid>[-name]``; copies left by runs that died are removed."""
    for old in CACHE.glob("root-*"):
        pid = old.name.removeprefix("root-").split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _kill_containers_of(old)
            shutil.rmtree(old, ignore_errors=True)
    root = CACHE / (f"root-{os.getpid()}-{name}" if name else f"root-{os.getpid()}")
    shutil.rmtree(root, ignore_errors=True)
    subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(root)], check=True)
    return root


def _kill_containers_of(root: Path) -> None:
    """Kill a container still booted from ``root`` by a test run that died (its init first)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if not argv[0].endswith(b"systemd-nspawn") or str(root).encode() not in argv:
                continue
            children = (entry / "task" / entry.name / "children").read_text().split()
            for pid in [*children, entry.name]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)


class Booted:
    """One booted container: ``start()``, ``run(...)`` inside, ``stop()`` (always, in teardown)."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root = root
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None  # the container's systemd, as the host sees it

    def start(self) -> float:
        """Boot; returns the seconds until systemd reported the system up."""
        started = time.monotonic()
        env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "0"}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "-q",
                    "--register=no",
                    "--keep-unit",
                    "-D",
                    str(self.root),
                    "--private-network",
                    "-b",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + BOOT_TIMEOUT
        while self.pid is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited:\n{self.log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no systemd in the container:\n{self.log.read_text()[-4000:]}")
            self.pid = self._init_pid()
            if self.pid is None:
                time.sleep(0.05)
        state = ""
        while time.monotonic() < deadline:
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return time.monotonic() - started
            time.sleep(0.2)
        raise TimeoutError(f"the container did not finish booting ({state}):\n{self.journal()}")

    def _init_pid(self) -> int | None:
        """systemd inside: the child of systemd-nspawn that runs /lib/systemd/systemd."""
        assert self.proc is not None
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
            for pid in children.split():
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
        return None

    def run(
        self, *argv: str, user: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        """A command inside, as root or as ``user``, with a clean environment."""
        assert self.pid is not None
        command = list(argv)
        if user is not None:
            command = ["runuser", "-u", user, "--", *command]
        done = subprocess.run(
            [
                "nsenter",
                "-t",
                str(self.pid),
                "-a",
                "env",
                "-i",
                f"PATH={PATH}",
                "HOME=/root",
                "LANG=C.UTF-8",
                "DEBIAN_FRONTEND=noninteractive",
                *command,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done

    def journal(self, unit: str | None = None) -> str:
        argv = ["journalctl", "--no-pager", "-n", "200"]
        if unit:
            argv += ["-u", unit]
        return self.run(*argv, check=False).stdout

    def network_state(self) -> str:
        """Everything braidd may change in the container's network namespace, as text."""
        return "\n".join(
            self.run(*argv, check=False).stdout
            for argv in (
                ("ip", "-4", "rule"),
                ("ip", "-6", "rule"),
                ("ip", "-4", "route", "show", "table", "all"),
                ("ip", "-6", "route", "show", "table", "all"),
                ("ip", "mptcp", "endpoint"),
                ("ip", "mptcp", "limits"),
                ("cat", "/proc/sys/net/mptcp/path_manager"),
                ("nft", "list", "ruleset"),
            )
        )

    def stop(self) -> None:
        """Power off (SIGTERM to systemd-nspawn asks the container's systemd to), or kill it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                if self.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, signal.SIGKILL)  # the container's init: all of it goes
                self.proc.kill()
                self.proc.wait(30)
        self.proc = None
