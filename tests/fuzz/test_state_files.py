"""braidd's state files, whatever they hold: loading reports a problem and goes on, never raises.

Regressions for what the fuzzer (run.py, targets.py) found in the daemon's
loaders. Each of these inputs used to raise out of braidd's start.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from braid.daemon.links.store import LinkStore
from braid.daemon.service import PAIRING_FILE, Daemon
from braid.daemon.settings import Settings
from braid.files import read_versioned_json
from braid.protocol.pairing import Pairing

DEEP = b"[" * 100_000  # json.loads raises RecursionError, not ValueError


def test_deeply_nested_json_is_unreadable_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b'{"version": 1, "x": ' + DEEP + b"}")
    problems: list[str] = []
    assert read_versioned_json(path, 1, problems) is None
    assert len(problems) == 1 and "nested too deeply" in problems[0]
    assert not path.exists()  # kept aside, like any unreadable file


@pytest.mark.parametrize("settings", [[1], "system", 5])
def test_settings_that_are_not_an_object_are_a_problem(tmp_path: Path, settings) -> None:
    (tmp_path / "settings.json").write_text(json.dumps({"version": 1, "settings": settings}))
    loaded = Settings(tmp_path).load()
    assert loaded["pool_size"] == 4  # the defaults
    assert any("not a JSON object" in p for p in loaded.problems)


@pytest.mark.parametrize("links", [["eth0"], "eth0", 1])
def test_links_that_are_not_an_object_are_a_problem(tmp_path: Path, links) -> None:
    (tmp_path / "links.json").write_text(json.dumps({"version": 1, "links": links}))
    (tmp_path / "usage.json").write_text(json.dumps({"version": 1, "usage": [links]}))
    store = LinkStore(tmp_path).load()
    assert store.choices == {} and store.usage == {}
    assert sum("not a JSON object" in p for p in store.problems) == 2


@pytest.mark.parametrize("field", ["limit_bytes", "reset_day"])
def test_infinite_cap_numbers_are_a_problem(tmp_path: Path, field: str) -> None:
    cap = {"limit_bytes": 10**9, "period": "month", field: float("inf")}  # int() overflowed
    links = {"wwan0": {"metered": True, "cap": cap}, "eth0": {"priority": "always"}}
    (tmp_path / "links.json").write_text(json.dumps({"version": 1, "links": links}))
    store = LinkStore(tmp_path).load()
    assert set(store.choices) == {"eth0"}
    assert any("wwan0" in p and "invalid cap" in p for p in store.problems)


def test_infinite_usage_is_skipped(tmp_path: Path) -> None:
    usage = {
        "wwan0": {"period": "2024-05", "bytes": float("inf")},
        "eth0": {"period": "x", "bytes": 5},
    }
    (tmp_path / "usage.json").write_text(json.dumps({"version": 1, "usage": usage}))
    store = LinkStore(tmp_path).load()
    assert set(store.usage) == {"eth0"}


@pytest.mark.parametrize(
    "content",
    [b"[1]", b'"braid://x"', b'{"uri": 1}', b'{"uri": null}', b"{}", DEEP, b"\xff"],
)
def test_unreadable_pairing_file_is_ignored(tmp_path: Path, caplog, content: bytes) -> None:
    (tmp_path / PAIRING_FILE).write_bytes(content)
    daemon = SimpleNamespace(config=SimpleNamespace(state_dir=tmp_path))
    with caplog.at_level(logging.WARNING):
        assert Daemon.saved_pairing(daemon) is None  # type: ignore[arg-type]
    assert "ignoring unreadable" in caplog.text


def test_saved_pairing_reads_what_was_saved(tmp_path: Path) -> None:
    pairing = Pairing("vps.example.org", 7443, "ab" * 32, "T" * 43)
    (tmp_path / PAIRING_FILE).write_text(json.dumps({"uri": pairing.uri()}))
    daemon = SimpleNamespace(config=SimpleNamespace(state_dir=tmp_path))
    assert Daemon.saved_pairing(daemon) == pairing  # type: ignore[arg-type]
