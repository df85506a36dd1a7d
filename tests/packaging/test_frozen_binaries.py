"""The frozen programs run from the unpacked packages: braid, braid-server and the tray.

Everything that touches routing runs in a network namespace of its own, made and removed
here; the tray runs offscreen, and under Xvfb with a tray host where those are installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from package_build import ROOT, Built, setpriv_capabilities, unit_capabilities

sys.path.insert(0, str(ROOT / "tests" / "gui"))
from fake_braidd import FakeBraidd

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(2400)]


def as_braidd(unpacked: Path) -> list[str]:
    """What braidd.service leaves the daemon: root, with its unit's capabilities only."""
    caps = setpriv_capabilities(unit_capabilities(unpacked / "lib/systemd/system/braidd.service"))
    return ["setpriv", f"--bounding-set={caps}", "--inh-caps=-all", "--no-new-privs", "--"]


def frozen(unpacked: Path, name: str) -> Path:
    return {
        "braid": unpacked / "opt/braid/braid/braid",
        "braid-tray": unpacked / "opt/braid/braid-tray/braid-tray",
        "braid-server": unpacked / "opt/braid-server/braid-server",
    }[name]


def run(argv: list, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 60)
    return subprocess.run([str(a) for a in argv], check=False, **kw)


def test_braid_runs_frozen_and_knows_its_version(built: Built, unpacked: Path) -> None:
    braid = frozen(unpacked, "braid")
    done = run([braid, "--help"])
    assert done.returncode == 0, done.stderr
    assert "daemon" in done.stdout
    # /usr/bin/braid is a link into /opt: the bundle must find itself through one
    link = unpacked / "braid-link"
    link.symlink_to(braid)
    try:
        assert run([link, "--help"]).returncode == 0
    finally:
        link.unlink()
    if "--version" not in done.stdout:
        pytest.xfail("braid --version is not wired in braid.cli yet")
    version = run([braid, "--version"])
    assert version.returncode == 0, version.stderr
    assert built.version in version.stdout


def test_the_frozen_tray_is_the_same_version(built: Built, unpacked: Path) -> None:
    metadata = list((unpacked / "opt/braid/braid-tray/_internal").glob("braid-*.dist-info"))
    assert [m.name for m in metadata] == [f"braid-{built.version}.dist-info"]
    metadata = list((unpacked / "opt/braid/braid/_internal").glob("braid-*.dist-info"))
    assert [m.name for m in metadata] == [f"braid-{built.version}.dist-info"]


def frozen_modules(executable: Path) -> set[str]:
    """The Python modules in a one-folder bundle's archive (embedded in its executable)."""
    readers = pytest.importorskip("PyInstaller.archive.readers")
    archive = readers.CArchiveReader(str(executable))
    return set(archive.open_embedded_archive("PYZ.pyz").toc)


def test_each_bundle_carries_what_it_imports_at_run_time_and_nothing_else(
    unpacked: Path,
) -> None:
    cli = frozen_modules(frozen(unpacked, "braid"))
    server = frozen_modules(frozen(unpacked, "braid-server"))
    tray = frozen_modules(frozen(unpacked, "braid-tray"))
    imported_late = {  # by name, inside functions, through entry points or package listings
        "braid": {
            "braid.daemon.service",
            "braid.daemon.links.networkmanager",
            "jeepney.io.blocking",
            "pyroute2.netlink.generic.mptcp",
            "pyroute2.netlink.rtnl.ifinfmsg.plugins.vlan",
        },
        "braid-server": {"braid.server.server", "cryptography.x509", "pyroute2"},
        "braid-tray": {
            "braid.gui.app",
            "braid.assets",
            "keyring.backends.SecretService",
            "secretstorage.util",
            "cryptography.hazmat.primitives.ciphers",  # Secret Service session encryption
            "jeepney.io.blocking",
        },
    }
    for name, modules in (("braid", cli), ("braid-server", server), ("braid-tray", tray)):
        assert imported_late[name] <= modules, imported_late[name] - modules
    desktop = ("PySide6", "shiboken6", "numpy", "pyqtgraph", "keyring", "braid.gui")
    assert not [m for m in cli | server if m.startswith(desktop)]
    assert not [m for m in server if m.startswith("braid.daemon")]
    assert not [m for m in tray if m.startswith(("braid.daemon", "braid.server", "pyroute2"))]
    assert not [m for m in cli | server | tray if m.startswith(("braid.netbed", "pytest"))]
    internal = unpacked / "opt/braid/braid-tray/_internal"
    for module in ("QtOpenGL", "QtOpenGLWidgets", "QtSvg", "QtNetwork", "QtDBus"):
        assert (internal / "PySide6" / f"{module}.abi3.so").exists(), module
    # keyring finds its backends through its entry points
    assert list(internal.glob("keyring-*.dist-info/entry_points.txt"))


@contextlib.contextmanager
def throwaway_netns() -> Iterator[str]:
    name = f"brdpkg{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_ns(ns: str, *argv: str) -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, check=True
    )
    return done.stdout


@pytest.mark.netns
def test_frozen_cleanup_removes_braids_leftovers_in_a_namespace(
    unpacked: Path, tmp_path: Path
) -> None:
    """braid daemon --cleanup, frozen and with only braidd's capabilities, in its own netns."""
    calls = tmp_path / "nft-calls"
    stubs = tmp_path / "bin"
    stubs.mkdir()
    nft = shutil.which("nft", path="/usr/sbin:/sbin:/usr/bin")
    assert nft, "nft is needed (Debian: nftables)"
    # Records the library path nft was started with, then runs the real nft.
    (stubs / "nft").write_text(
        f'#!/bin/sh\necho "LD_LIBRARY_PATH=${{LD_LIBRARY_PATH-unset}}" >> {calls}\n'
        f'exec {nft} "$@"\n'
    )
    (stubs / "nft").chmod(0o755)
    with throwaway_netns() as ns:
        for argv in (
            "ip link add brd-test type veth peer name brd-peer",
            "ip link set brd-peer up",
            "ip link set brd-test up",
            "ip addr add 198.18.200.2/24 dev brd-test",
            "ip route add default via 198.18.200.1 dev brd-test table 18400",
            "ip rule add from 198.18.200.2 lookup 18400 priority 18400 protocol 98",
            "ip rule add from 198.18.200.3 lookup 100 priority 1000",  # not Braid's
            "ip mptcp endpoint add 198.18.200.2 id 180 subflow dev brd-test",
            "ip mptcp endpoint add 198.18.200.4 id 5 subflow dev brd-test",  # not Braid's
            "nft add table inet braid",
            "nft add table inet theirs",
        ):
            in_ns(ns, *argv.split())
        env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"}
        done = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                ns,
                *as_braidd(unpacked),
                str(frozen(unpacked, "braid")),
                "daemon",
                "--cleanup",
                "--state-dir",
                str(tmp_path / "state"),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Traceback" not in done.stderr
        rules = in_ns(ns, "ip", "rule")
        assert "lookup 18400" not in rules and "lookup 100" in rules
        assert in_ns(ns, "ip", "route", "show", "table", "18400").strip() == ""
        endpoints = in_ns(ns, "ip", "mptcp", "endpoint")
        assert "id 180 " not in endpoints and "id 5 " in endpoints
        tables = in_ns(ns, "nft", "list", "tables")
        assert "inet braid" not in tables and "inet theirs" in tables
    # nft ran with the system's libraries, not the bundle's
    lines = calls.read_text().splitlines()
    assert lines and all(line == "LD_LIBRARY_PATH=unset" for line in lines), lines


def test_frozen_server_init_prints_a_pairing_uri(unpacked: Path, tmp_path: Path) -> None:
    server = frozen(unpacked, "braid-server")
    state = tmp_path / "server-state"
    argv = [server, "init", "--state-dir", state, "--listen", "127.0.0.1:7443"]
    done = run([*argv, "--public-host", "127.0.0.1"])
    assert done.returncode == 0, done.stderr
    uri = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"braid://127\.0\.0\.1:7443\?fp=[0-9a-f]{64}&token=[\w-]+", uri), uri
    assert (state / "server.json").is_file()
    assert (state / "key.pem").stat().st_mode & 0o077 == 0
    again = run([*argv, "--public-host", "127.0.0.1"])
    assert again.returncode == 0 and "already initialised" in again.stdout
    shown = run([server, "show", "--state-dir", state])
    assert shown.returncode == 0 and uri.split("fp=")[1].split("&")[0] in shown.stdout


def tray_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    (tmp_path / "home").mkdir(exist_ok=True)  # without one, fontconfig rescans at every start
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DISPLAY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS")
    }
    env.update(
        HOME=str(tmp_path / "home"),
        XDG_RUNTIME_DIR=str(runtime),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        XDG_DATA_HOME=str(tmp_path / "data"),
        PYTHON_KEYRING_BACKEND="keyring.backends.fail.Keyring",  # never the user's keyring
        **extra,
    )
    return env


def wait_for_line(log: Path, text: str, proc: subprocess.Popen, timeout: float) -> float:
    """Seconds until ``text`` appears in ``log``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if text in log.read_text(errors="replace"):
            return time.monotonic() - started
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    raise AssertionError(f"no {text!r} from the tray:\n{log.read_text(errors='replace')}")


def dump_state(tray_bin: Path, env: dict[str, str], path: Path) -> dict:
    """Ask the running tray for its state (through its single-instance socket, so its event
    loop, and with it its signal handling, is running once this returns)."""
    asked = run([tray_bin, "--dump", path], env=env, timeout=30)
    assert asked.returncode == 0, asked.stdout + asked.stderr
    deadline = time.monotonic() + 10
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return json.loads(path.read_text())


def stop_tray(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def test_frozen_tray_starts_offscreen_and_quits_cleanly(unpacked: Path, tmp_path: Path) -> None:
    log = tmp_path / "tray.log"
    env = tray_env(tmp_path, QT_QPA_PLATFORM="offscreen")
    with open(log, "wb") as out:
        tray = subprocess.Popen(
            [frozen(unpacked, "braid-tray"), "--control", str(tmp_path / "no-daemon.sock")],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        # offscreen has no system tray: the dashboard stands in for it
        wait_for_line(log, "showing the dashboard instead", tray, 60)
        wait_for_line(log, "daemon is not running", tray, 30)
        state = dump_state(frozen(unpacked, "braid-tray"), env, tmp_path / "state.json")
        assert state["dashboard_visible"] and not state["daemon_connected"], state
    finally:
        code = stop_tray(tray)
    text = log.read_text(errors="replace")
    assert code == 0, text
    assert "Traceback" not in text and "Could not load the Qt platform plugin" not in text


def start_display(tmp_path: Path) -> tuple[str, list[subprocess.Popen]]:
    for number in range(150, 250):
        if (
            not Path(f"/tmp/.X11-unix/X{number}").exists()
            and not Path(f"/tmp/.X{number}-lock").exists()
        ):
            break
    display = f":{number}"
    xvfb = subprocess.Popen(
        ["Xvfb", display, "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 15
    while not Path(f"/tmp/.X11-unix/X{number}").exists():
        assert xvfb.poll() is None and time.monotonic() < deadline, "Xvfb did not start"
        time.sleep(0.05)
    trayer = subprocess.Popen(
        ["trayer", "--edge", "top", "--align", "right", "--widthtype", "request"],
        env={**os.environ, "DISPLAY": display},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # trayer maps its panel window once it has taken the tray selection
    deadline = time.monotonic() + 15
    while shutil.which("xwininfo") and time.monotonic() < deadline and trayer.poll() is None:
        windows = subprocess.run(
            ["xwininfo", "-root", "-children", "-display", display],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        if '("panel" "trayer")' in windows:
            break
        time.sleep(0.05)
    else:
        time.sleep(1.5)
    assert trayer.poll() is None, "trayer did not start"
    return display, [trayer, xvfb]


@pytest.mark.skipif(
    not (shutil.which("Xvfb") and shutil.which("trayer")),
    reason="needs Xvfb and trayer (./dev setup installs them)",
)
def test_frozen_tray_shows_its_icon_in_a_real_tray(
    built: Built, unpacked: Path, tmp_path: Path
) -> None:
    """Under Xvfb with trayer: from exec to the tray icon shown, connected to a (fake) braidd."""
    display, helpers = start_display(tmp_path)
    daemon = FakeBraidd(tmp_path / "control.sock", [("eth0", "ethernet"), ("wlan0", "wifi")])
    daemon.start()
    daemon.state, daemon.server, daemon.connected_since = (
        "connected",
        "203.0.113.7:7443",
        time.time(),
    )
    x11 = tray_env(tmp_path, QT_QPA_PLATFORM="xcb", DISPLAY=display)
    # a Wayland session whose XWayland is the display: the bundle has no Wayland plugin
    wayland = tray_env(tmp_path, QT_QPA_PLATFORM="wayland", XDG_SESSION_TYPE="wayland")
    wayland["DISPLAY"] = display
    tray_bin = frozen(unpacked, "braid-tray")
    try:
        timings = []
        for attempt, env in enumerate([x11, x11, x11, wayland]):
            log = tmp_path / f"tray-{attempt}.log"
            with open(log, "wb") as out:
                started = time.monotonic()
                tray = subprocess.Popen(
                    [tray_bin, "--control", str(daemon.path)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            try:
                wait_for_line(log, "system tray available: true", tray, 60)
                timings.append(time.monotonic() - started)
                wait_for_line(log, "connected to braidd", tray, 30)
                state = dump_state(tray_bin, env, tmp_path / f"state-{attempt}.json")
                assert state["tray_visible"] and state["tray_available"], state
                assert state["daemon_connected"], state
            finally:
                code = stop_tray(tray)
            text = log.read_text(errors="replace")
            assert code == 0 and "Traceback" not in text, text
            assert "Could not find the Qt platform plugin" not in text, text
        built.note(
            "frozen tray, exec to icon shown (Xvfb + trayer, fresh HOME): first "
            f"{timings[0]:.2f} s, then {', '.join(f'{t:.2f}' for t in timings[1:3])} s"
        )
    finally:
        daemon.stop()
        for helper in helpers:
            helper.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                helper.wait(10)
