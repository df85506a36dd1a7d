"""The tray's tests: offscreen Qt, a fake braidd on a real Unix socket, a real keyring backend.

Every test gets its own XDG config and runtime directories and HOME, so nothing it saves
(settings, tokens, autostart entries, the single-instance socket) touches the user's.
"""

from __future__ import annotations

import os

os.environ["QT_QPA_PLATFORM"] = "offscreen"  # before anything imports Qt

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("PySide6", reason="the tray needs the gui extra: pip install -e '.[gui]'")
pytest.importorskip("pyqtgraph")
keyring = pytest.importorskip("keyring")

from fake_braidd import FakeBraidd  # noqa: E402
from keyring.backend import KeyringBackend  # noqa: E402

import braid.gui  # noqa: E402, F401 - first: it shields Python 3.11 from PySide6 6.12's refcount bug


def pytest_configure(config: pytest.Config) -> None:
    # A waitSignal/waitUntil that times out must fail the test, never pass quietly.
    config._inicache["qt_default_raising"] = "true"


class FileKeyring(KeyringBackend):
    """A real keyring backend (the library's own interface) that keeps secrets in a file."""

    priority = 1  # type: ignore[assignment] - keyring's class property, a plain value here

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def _load(self) -> dict[str, dict[str, str]]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}

    def get_password(self, service: str, username: str) -> str | None:
        return self._load().get(service, {}).get(username)

    def set_password(self, service: str, username: str, password: str) -> None:
        data = self._load()
        data.setdefault(service, {})[username] = password
        self.path.write_text(json.dumps(data))

    def delete_password(self, service: str, username: str) -> None:
        data = self._load()
        data.get(service, {}).pop(username, None)
        self.path.write_text(json.dumps(data))


@pytest.fixture(autouse=True)
def private_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Config, runtime dir and HOME of this test alone."""
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    runtime = Path(tempfile.mkdtemp(prefix="braid-rt-"))  # short: socket paths have a limit
    runtime.chmod(0o700)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    yield home
    shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture
def file_keyring(tmp_path: Path) -> Iterator[FileKeyring]:
    backend = FileKeyring(tmp_path / "keyring.json")
    previous = keyring.get_keyring()
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(previous)


@pytest.fixture
def no_keyring() -> Iterator[None]:
    from keyring.backends import fail

    previous = keyring.get_keyring()
    keyring.set_keyring(fail.Keyring())
    yield
    keyring.set_keyring(previous)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="braid-ctl-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(socket_dir: Path) -> Iterator[FakeBraidd]:
    fake = FakeBraidd(socket_dir / "control.sock").start()
    yield fake
    fake.stop()


@pytest.fixture
def client(qtbot, daemon: FakeBraidd):
    from braid.gui.client import DaemonClient

    daemon_client = DaemonClient(str(daemon.path), retry_delays=(0.05, 0.1, 0.2))
    with qtbot.waitSignal(daemon_client.status, timeout=5000):
        daemon_client.start()
    yield daemon_client
    with contextlib.suppress(RuntimeError):
        daemon_client.stop()


@pytest.fixture
def ask(qtbot):
    """Send a request through a DaemonClient method and wait for its own reply: (ok, result)."""

    def ask(client, method: str, *args, **kwargs):
        replies: dict[int, tuple[bool, object]] = {}

        def take(request_id: int, ok: bool, result: object) -> None:
            replies[request_id] = (ok, result)

        client.reply.connect(take)
        try:
            request = getattr(client, method)(*args, **kwargs)
            qtbot.waitUntil(lambda: request in replies, timeout=5000)
        finally:
            client.reply.disconnect(take)
        return replies[request]

    return ask


@pytest.fixture
def session(qtbot, daemon: FakeBraidd):
    """A Session on a DaemonClient connected to the fake daemon, as the tray builds it."""
    from braid.gui.client import DaemonClient
    from braid.gui.preferences import Preferences
    from braid.gui.session import Session
    from braid.gui.tokens import TokenStore

    daemon_client = DaemonClient(str(daemon.path), retry_delays=(0.05, 0.1, 0.2))
    tray_session = Session(daemon_client, Preferences(), TokenStore())
    with qtbot.waitSignal(daemon_client.status, timeout=5000):
        daemon_client.start()
    qtbot.waitUntil(lambda: daemon.subscribers == 1, timeout=3000)
    yield tray_session
    with contextlib.suppress(RuntimeError):
        daemon_client.stop()
