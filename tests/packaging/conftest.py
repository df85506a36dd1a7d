"""The Debian packages, built once per test session with packaging/build, and unpacked.

Building takes a few minutes (three PyInstaller bundles, xz). BRAID_PACKAGES=DIR tests the
.deb files already in DIR instead (e.g. dist/ after packaging/build). The figures (sizes,
build time, the tray's start) go to test-output/packaging.txt as well as the test log.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from package_build import BUILD, BUILD_TIMEOUT, Built, build_unavailable, project_version


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "packaging: builds the Debian packages (minutes; runs in CI, once a session)"
    )


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    version = project_version()
    prebuilt = os.environ.get("BRAID_PACKAGES")
    if prebuilt:
        dist, seconds, log, table = Path(prebuilt), None, "", ""
    else:
        reason = build_unavailable()
        if reason:
            pytest.skip(reason)
        base = tmp_path_factory.mktemp("packages")
        dist = base / "dist"
        env = {**os.environ, "BRAID_PYTHON": sys.executable}
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, str(BUILD), "--dist", str(dist), "--work", str(base / "work")],
            capture_output=True,
            text=True,
            env=env,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
        seconds = time.monotonic() - started
        log = done.stdout + done.stderr
        assert done.returncode == 0, f"packaging/build failed:\n{log[-8000:]}"
        table = done.stdout[done.stdout.find("bundle ") :]  # the figures it ends with
    result = Built(
        dist=dist,
        version=version,
        laptop=dist / f"braid_{version}_amd64.deb",
        server=dist / f"braid-server_{version}_amd64.deb",
        seconds=seconds,
        log=log,
    )
    assert result.laptop.is_file() and result.server.is_file(), sorted(dist.iterdir())
    if seconds is not None:
        result.note(f"build time (packaging/build, both packages): {seconds:.0f} s")
        for line in table.splitlines():
            if line.strip():
                result.note(line)
    return result


@pytest.fixture(scope="session")
def unpacked(built: Built) -> Iterator[Path]:
    """Both packages extracted into one directory, as they would lie on an installed system.

    The directory is one of its own under the system's temporary directory, readable by
    all: the tunnel test runs the server as an unprivileged user, as its unit does.
    """
    root = Path(tempfile.mkdtemp(prefix="braid-unpacked-"))
    try:
        root.chmod(0o755)
        for deb in (built.laptop, built.server):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
