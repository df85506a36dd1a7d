"""The real tray against the real daemon: the namespace world, Xvfb and a tray host.

braid-server and braidd run in the test world; the tray runs outside it, as a user's
would, reaching braidd through its control socket file. A download goes through Braid
while the test checks that the icon sits in the tray, that the graphs hold traffic on
every link, and saves screenshots of the tray menu, the dashboard and the settings
dialog under test-output/gui/.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from desktop import OUTPUT, SCREEN, Desktop

from braid.netbed import LinkSpec, World, unavailable_reason
from braid.netbed.stack import BraidStack, run_traffic
from braid.netbed.stack import wait_for as netbed_wait_for

pytestmark = pytest.mark.netns

LINKS = [
    LinkSpec("eth0", "ethernet", rate_mbit=40, rtt_ms=10),
    LinkSpec("wlan0", "wifi", rate_mbit=30, rtt_ms=20),
    LinkSpec("usb0", "cellular", rate_mbit=20, rtt_ms=40),
]
X_TOOLS = ("Xvfb", "trayer", "import", "xwininfo")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    value = netbed_wait_for(predicate, timeout, interval)
    assert value, f"timed out after {timeout:g} s waiting for {what}"
    return value


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    missing = [tool for tool in X_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (Debian: xvfb trayer imagemagick x11-utils)")
    with World(LINKS) as w:
        yield w


@pytest.fixture(scope="module")
def stack(world: World) -> Iterator[BraidStack]:
    braid = BraidStack(world)
    public = Path(tempfile.mkdtemp(prefix="braid-control-"))
    public.chmod(0o755)  # the tray, like any user, must reach the socket
    braid.control_path = public / "control.sock"
    try:
        with braid:
            yield braid
    finally:
        shutil.rmtree(public, ignore_errors=True)


class TrayDesktop(Desktop):
    """Xvfb with a tray host (trayer) on a dark panel and a wallpaper, and the tray on it; the
    session's own D-Bus, if any."""

    def __init__(self, control: Path) -> None:
        super().__init__("x11", control, None, "tray")

    def furnish(self) -> None:
        width, height = SCREEN
        self._spawn(
            [
                "trayer",
                "--edge", "top",
                "--align", "right",
                "--widthtype", "request",
                "--height", "28",
                "--tint", "0x2d2d2d",
                "--transparent", "true",
                "--alpha", "0",
                "--SetDockType", "true",
            ]
        )  # fmt: skip
        wait_for(lambda: '"panel"' in self.windows(), 10, "trayer's panel")
        # A wallpaper, so screenshots show windows against something (after trayer, which
        # blanks the root window when it starts).
        wallpaper = self.home / "wallpaper.png"
        subprocess.run(
            ["convert", "-size", f"{width}x{height}", "gradient:#50607a-#232a35", str(wallpaper)],
            check=False,
        )
        if wallpaper.exists() and shutil.which("display"):
            self._spawn(["display", "-window", "root", str(wallpaper)]).wait(20)

    def windows(self) -> str:
        done = subprocess.run(
            ["xwininfo", "-root", "-tree"], env=self.env, capture_output=True, text=True
        )
        return done.stdout


def traffic_on(state: dict, names: tuple[str, ...], samples: int = 6) -> bool:
    """Every named link has carried traffic for a few samples, and the graphs show it."""
    return all(
        state["history"].get(name, {}).get("rx_nonzero", 0) >= samples
        and state["curves"].get(name, {}).get("rx", 0) > 1e6
        for name in names
    )


def test_real_tray_on_a_real_daemon(world: World, stack: BraidStack) -> None:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    desktop = TrayDesktop(stack.control_path).start()
    download: dict = {}
    try:
        wait_for(lambda: "system tray available: true" in desktop.log.read_text(), 20, "the tray")
        state = wait_for(
            lambda: (s := desktop.state())["links"] == ["eth0", "wlan0", "usb0"] and s,
            20,
            "the tray to see the daemon's links",
        )
        assert state["daemon_connected"] and state["tray_available"] and state["tray_visible"]
        assert state["icon_state"] == "connected", state
        # The icon is embedded in the tray host: a window of ours inside trayer's panel.
        tree = desktop.windows()
        panel = tree[tree.index('"panel"') :]
        assert '("braid-tray" "Braid")' in panel, tree

        desktop.ask("--show", "dashboard")

        def fetch() -> None:
            download.update(
                run_traffic(
                    world,
                    "download",
                    world.target_v4,
                    "--bytes",
                    "480M",
                    "--socks",
                    "127.0.0.1:1080",
                    "--timeout",
                    "30",
                )
            )

        thread = threading.Thread(target=fetch, daemon=True)
        thread.start()

        names = ("eth0", "wlan0", "usb0")
        state = wait_for(
            lambda: traffic_on(s := desktop.state(), names) and s,
            40,
            "traffic on every link in the graphs",
            0.5,
        )
        assert state["dashboard_visible"]
        total = state["curves"]["total"]["rx"]
        best = max(state["curves"][name]["rx"] for name in names)
        assert total > best, state["curves"]  # the bonded total above the best single link

        desktop.ask("--show", "menu")
        time.sleep(0.5)  # let the popup paint before the picture
        desktop.screenshot("tray", crop=f"560x330+{SCREEN[0] - 560}+0")
        menu = desktop.state()["menu"]
        for name in names:
            assert any(line.startswith(name) and "Mbit/s" in line for line in menu), menu
        desktop.ask("--show", "dashboard")  # closes the menu

        # The phone's ISP goes silent: the icon turns degraded, then back when it returns.
        world.blackhole("usb0")
        state = wait_for(
            lambda: (s := desktop.state())["icon_state"] == "degraded" and s, 10, "degraded"
        )
        assert "usb0" in state["tooltip"], state["tooltip"]
        time.sleep(0.5)
        desktop.screenshot("tray-degraded", crop=f"560x200+{SCREEN[0] - 560}+0")
        time.sleep(4)
        world.restore("usb0")
        wait_for(lambda: desktop.state()["icon_state"] == "connected", 15, "usb0 back")
        wait_for(
            lambda: traffic_on(desktop.state(), names, samples=20), 40, "traffic after the cut"
        )
        desktop.ask("--show", "dashboard")
        time.sleep(0.5)
        desktop.screenshot("dashboard")

        desktop.ask("--show", "settings", "--page", "server")
        wait_for(lambda: desktop.state()["settings_visible"], 10, "the settings dialog")
        time.sleep(0.5)
        desktop.screenshot("settings-server")
        for page in ("links", "traffic", "general"):
            desktop.ask("--show", "settings", "--page", page)
            time.sleep(0.5)
            desktop.screenshot(f"settings-{page}")

        thread.join(180)
        assert download.get("ok"), download

        # The server restarts: the tray says braidd is retrying, and why, then connected again.
        assert stack.server is not None
        stack.server.terminate()
        stack.server.wait(10)
        state = wait_for(
            lambda: (s := desktop.state())["icon_state"] == "connecting" and s,
            20,
            "the tray to show the lost server",
        )
        assert "unreachable" in state["tooltip"] and "retrying" in state["tooltip"], state
        time.sleep(0.5)
        desktop.screenshot("tray-server-lost", crop=f"560x200+{SCREEN[0] - 560}+0")
        stack.start_server()
        wait_for(lambda: desktop.state()["icon_state"] == "connected", 30, "the server back")
        after = run_traffic(
            world,
            "download",
            world.target_v4,
            "--bytes",
            "4M",
            "--socks",
            "127.0.0.1:1080",
            "--timeout",
            "20",
        )
        assert after["ok"] and after["sha256"] == after["expected_sha256"], after
    finally:
        code = desktop.stop()
    assert code == 0, desktop.log.read_text()[-3000:]
