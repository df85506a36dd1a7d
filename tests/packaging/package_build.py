"""What the packaging tests share: where things are, the build's result, its figures."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "packaging" / "build"
FIGURES = ROOT / "test-output" / "packaging.txt"
BUILD_TIMEOUT = 1800


def project_version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def build_unavailable() -> str | None:
    """Why the packages cannot be built here (only when a tool is truly absent)."""
    if shutil.which("dpkg-deb") is None:
        return "dpkg-deb is not installed (Debian: apt install dpkg)"
    probe = subprocess.run(
        [sys.executable, "-c", "import PyInstaller"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        return "PyInstaller is not installed (./dev setup installs it)"
    return None


@dataclass
class Built:
    dist: Path
    version: str
    laptop: Path  # braid_<version>_amd64.deb
    server: Path  # braid-server_<version>_amd64.deb
    seconds: float | None  # None: built before the session
    log: str
    figures: list[str] = field(default_factory=list)

    def note(self, line: str) -> None:
        """A figure for the report: printed, and kept in test-output/packaging.txt."""
        print(line)
        self.figures.append(line)
        FIGURES.parent.mkdir(parents=True, exist_ok=True)
        FIGURES.write_text("\n".join(self.figures) + "\n")


CAPABILITY_NUMBERS = {"CAP_NET_BIND_SERVICE": 10, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13}


def unit_settings(path: Path) -> dict[str, list[str]]:
    """A systemd unit's settings, every value of a repeated key kept in order."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def unit_capabilities(path: Path) -> list[str]:
    """The unit's CapabilityBoundingSet, e.g. ["CAP_NET_ADMIN", "CAP_NET_RAW"]."""
    return unit_settings(path)["CapabilityBoundingSet"][0].split()


def setpriv_capabilities(capabilities: list[str]) -> str:
    """The same set as setpriv writes it: "-all,+net_admin,+net_raw"."""
    return ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in capabilities)])


def capability_mask(capabilities: list[str]) -> int:
    """The set as /proc/PID/status shows it (CapEff, CapBnd)."""
    return sum(1 << CAPABILITY_NUMBERS[c] for c in capabilities)
