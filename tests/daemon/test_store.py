"""Link choices and data usage on disk: periods, validation, and unreadable files kept aside."""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest

from braid.daemon.links.model import Priority
from braid.daemon.links.store import Cap, LinkChoice, LinkStore, StoreError
from braid.daemon.settings import Settings


def ts(year: int, month: int, day: int) -> float:
    return time.mktime(dt.date(year, month, day).timetuple()) + 3600


@pytest.mark.parametrize(
    ("reset_day", "when", "period"),
    [
        (1, (2026, 11, 26), "2026-11-01"),
        (15, (2026, 11, 14), "2026-10-15"),
        (15, (2026, 11, 15), "2026-11-15"),
        (28, (2026, 1, 3), "2025-12-28"),
    ],
)
def test_monthly_period_starts_on_the_reset_day(reset_day, when, period) -> None:
    assert Cap(10, "month", reset_day).period_key(ts(*when)) == period


def test_daily_period_is_the_date() -> None:
    assert Cap(10, "day").period_key(ts(2026, 11, 26)) == "2026-11-26"


@pytest.mark.parametrize(
    "bad",
    [
        {"limit_bytes": 0},
        {"limit_bytes": 5, "period": "week"},
        {"limit_bytes": 5, "reset_day": 31},
        {"limit_bytes": 5, "then": "always"},
        {"period": "day"},
        "10G",
    ],
)
def test_invalid_caps_are_refused_with_a_reason(bad) -> None:
    with pytest.raises(StoreError):
        Cap.from_json(bad)


def test_choice_validation() -> None:
    choice = LinkChoice()
    choice.update({"priority": "backup", "order": 2, "metered": True})
    assert choice.priority is Priority.BACKUP
    for bad in ({"priority": "sometimes"}, {"order": -1}, {"metered": "yes"}, {"kind": "modem"}):
        with pytest.raises(StoreError):
            choice.update(bad)


def test_links_the_user_added_are_kept_and_files_without_them_still_load(tmp_path) -> None:
    store = LinkStore(tmp_path)
    store.choice("enx0c5b8f279a64").update({"kind": "cellular"})
    store.choice("enx0c5b8f279a64").added = True
    store.choice("wlan0").update({"priority": "backup"})
    store.save_choices()
    again = LinkStore(tmp_path).load()
    assert again.added() == ["enx0c5b8f279a64"]
    assert again.choice("enx0c5b8f279a64").kind == "cellular"
    assert again.problems == []
    # a file written before links could be added
    (tmp_path / "links.json").write_text(
        json.dumps({"version": 1, "links": {"wlan0": {"priority": "backup"}}})
    )
    older = LinkStore(tmp_path).load()
    assert older.added() == [] and older.choice("wlan0").priority is Priority.BACKUP
    (tmp_path / "links.json").write_text(
        json.dumps({"version": 1, "links": {"usb1": {"added": "yes"}}})
    )
    bad = LinkStore(tmp_path).load()
    assert bad.added() == []
    assert bad.problems == ["settings of link usb1 ignored: added must be true or false"]


def test_usage_is_kept_and_resets_with_the_period(tmp_path) -> None:
    store = LinkStore(tmp_path).load()
    store.choice("usb0").cap = Cap(1000, "day")
    store.count("usb0", 600, now=ts(2026, 11, 26))
    store.count("usb0", 300, now=ts(2026, 11, 26))
    store.save_usage()
    store.save_choices()
    again = LinkStore(tmp_path).load()
    assert again.usage["usb0"].bytes == 900
    assert again.choice("usb0").cap == Cap(1000, "day")
    assert again.count("usb0", 50, now=ts(2026, 11, 27)) == 50  # a new day


def test_unreadable_files_are_kept_aside_and_reported(tmp_path) -> None:
    (tmp_path / "links.json").write_text("{ not json")
    (tmp_path / "usage.json").write_text(json.dumps({"version": 99, "usage": {}}))
    store = LinkStore(tmp_path).load()
    assert len(store.problems) == 2
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert any(name.startswith("links.json.unreadable-") for name in kept)
    assert any(name.startswith("usage.json.unreadable-") for name in kept)
    assert "links.json" not in kept


def test_settings_validate_and_persist(tmp_path) -> None:
    settings = Settings(tmp_path).load()
    assert settings["probe_interval_ms"] == 200
    settings.update({"probe_interval_ms": 300})
    assert Settings(tmp_path).load()["probe_interval_ms"] == 300
    for bad in ({"probe_interval_ms": 10}, {"pool_size": "4"}, {"mode": "turbo"}, {"nope": 1}):
        with pytest.raises(ValueError):
            settings.update(bad)


def test_a_bad_bypass_entry_changes_nothing_and_a_hand_edited_one_is_ignored(tmp_path) -> None:
    settings = Settings(tmp_path).load()
    settings.update({"bypass": ["netflix.com", "192.0.2.0/24"]})
    saved = (tmp_path / "settings.json").read_text()
    with pytest.raises(ValueError, match=r"'net flix\.com' is not"):
        settings.update({"bypass": ["ok.example", "net flix.com"], "pool_size": 2})
    assert (tmp_path / "settings.json").read_text() == saved
    assert settings["bypass"] == ["netflix.com", "192.0.2.0/24"] and settings["pool_size"] == 4
    # A file edited by hand: the bad list is reported and left out, the rest still loads.
    (tmp_path / "settings.json").write_text(
        saved.replace('"netflix.com"', '"-bad-.com"').replace('"pool_size": 4', '"pool_size": 6')
    )
    loaded = Settings(tmp_path).load()
    assert loaded["bypass"] == [] and loaded["pool_size"] == 6
    assert any("bypass ignored" in problem for problem in loaded.problems), loaded.problems


@pytest.fixture
def full_disk(tmpfs):
    """A 64 kB tmpfs, which the test fills."""
    return tmpfs()


def _fill(directory) -> None:
    with open(directory / "filler", "wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 4096)
                out.flush()
        except OSError:
            pass


def test_a_full_disk_never_truncates_the_existing_files(full_disk) -> None:
    store = LinkStore(full_disk).load()
    store.choice("usb0").update({"priority": "backup", "cap": {"limit_bytes": 10**9}})
    store.save_choices()
    settings = Settings(full_disk).load()
    settings.update({"pool_size": 6})
    links_before = (full_disk / "links.json").read_bytes()
    settings_before = (full_disk / "settings.json").read_bytes()
    _fill(full_disk)
    store.choice("usb0").update({"priority": "never", "metered": True, "order": 3})
    with pytest.raises(OSError):
        for _ in range(50):  # grow the file until it no longer fits
            store.choice(f"extra{_}").update({"kind": "other"})
            store.save_choices()
    with pytest.raises(OSError):
        settings.update({"bypass": ["192.0.2.0/24"] * 2000})
    assert (full_disk / "links.json").read_bytes() == links_before
    assert (full_disk / "settings.json").read_bytes() == settings_before
    assert settings["pool_size"] == 6 and settings["bypass"] == []
    assert not [
        p for p in full_disk.iterdir() if p.name.startswith(".")
    ]  # no half-written file left
