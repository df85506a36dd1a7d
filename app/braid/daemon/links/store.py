"""What the user chose for each link, and how much data each metered link used.

Kept in the daemon's state directory as JSON with a format version. A file that
cannot be read is moved aside (never silently replaced) and reported.
"""

from __future__ import annotations

import calendar
import contextlib
import datetime as dt
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from braid.daemon.links.model import KINDS, Priority
from braid.files import object_field, read_versioned_json, write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LINKS_FILE = "links.json"
USAGE_FILE = "usage.json"
PERIODS = ("day", "month")


class StoreError(ValueError):
    """A value the user sent is not acceptable; the message says why."""


@dataclass
class Cap:
    """A data allowance: ``limit_bytes`` per day or per month (the month starts on ``reset_day``)."""

    limit_bytes: int
    period: str = "month"
    reset_day: int = 1
    then: Priority = Priority.NEVER  # what the link becomes once the cap is reached

    @classmethod
    def from_json(cls, data: Any) -> Cap:
        if not isinstance(data, dict):
            raise StoreError("cap must be an object with limit_bytes, period, reset_day, then")
        try:
            cap = cls(
                limit_bytes=int(data["limit_bytes"]),
                period=str(data.get("period", "month")),
                reset_day=int(data.get("reset_day", 1)),
                then=Priority(data.get("then", "never")),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # int(1e999): Overflow
            raise StoreError(f"invalid cap: {exc}") from None
        if cap.limit_bytes <= 0:
            raise StoreError("cap limit_bytes must be positive")
        if cap.period not in PERIODS:
            raise StoreError(f"cap period must be one of {', '.join(PERIODS)}")
        if not 1 <= cap.reset_day <= 28:
            raise StoreError("cap reset_day must be between 1 and 28 (every month has it)")
        if cap.then is Priority.ALWAYS:
            raise StoreError("a link over its cap can become backup or never, not always")
        return cap

    def to_json(self) -> dict:
        return {**asdict(self), "then": str(self.then)}

    def period_key(self, now: float | None = None) -> str:
        """Names the current billing period; usage resets when it changes."""
        today = dt.date.fromtimestamp(time.time() if now is None else now)
        if self.period == "day":
            return today.isoformat()
        year, month = today.year, today.month
        if today.day < self.reset_day:
            month -= 1
            if month == 0:
                year, month = year - 1, 12
        day = min(self.reset_day, calendar.monthrange(year, month)[1])
        return dt.date(year, month, day).isoformat()


@dataclass
class LinkChoice:
    """The user's settings for one link (None: use the default)."""

    kind: str | None = None
    priority: Priority | None = None
    order: int | None = None
    metered: bool | None = None
    cap: Cap | None = None
    added: bool = False  # the user made this interface a link (braid links add)

    @classmethod
    def from_json(cls, data: Any) -> LinkChoice:
        if not isinstance(data, dict):
            raise StoreError("a link's settings must be an object")
        choice = cls()
        choice.update(data)
        added = data.get("added", False)
        if not isinstance(added, bool):
            raise StoreError("added must be true or false")
        choice.added = added
        return choice

    def update(self, data: dict) -> None:
        """Apply the keys present in ``data``, validating each."""
        if "kind" in data:
            kind = data["kind"]
            if kind is not None and kind not in KINDS:
                raise StoreError(f"kind must be one of {', '.join(KINDS)}")
            self.kind = kind
        if "priority" in data:
            try:
                self.priority = None if data["priority"] is None else Priority(data["priority"])
            except ValueError:
                raise StoreError(
                    f"priority must be one of {', '.join(p.value for p in Priority)}"
                ) from None
        if "order" in data:
            order = data["order"]
            if order is not None and (not isinstance(order, int) or order < 0):
                raise StoreError("order must be a non-negative integer")
            self.order = order
        if "metered" in data:
            metered = data["metered"]
            if metered is not None and not isinstance(metered, bool):
                raise StoreError("metered must be true or false")
            self.metered = metered
        if "cap" in data:
            self.cap = None if data["cap"] is None else Cap.from_json(data["cap"])

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "priority": None if self.priority is None else str(self.priority),
            "order": self.order,
            "metered": self.metered,
            "cap": None if self.cap is None else self.cap.to_json(),
            "added": self.added,
        }


@dataclass
class Usage:
    period: str
    bytes: int = 0


@dataclass
class LinkStore:
    state_dir: Path
    choices: dict[str, LinkChoice] = field(default_factory=dict)
    usage: dict[str, Usage] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def load(self) -> LinkStore:
        data = read_versioned_json(self.state_dir / LINKS_FILE, FORMAT_VERSION, self.problems)
        links = object_field(data, "links", self.state_dir / LINKS_FILE, self.problems)
        for name, raw in links.items():
            try:
                self.choices[name] = LinkChoice.from_json(raw)
            except StoreError as exc:
                self.problems.append(f"settings of link {name} ignored: {exc}")
        data = read_versioned_json(self.state_dir / USAGE_FILE, FORMAT_VERSION, self.problems)
        usage = object_field(data, "usage", self.state_dir / USAGE_FILE, self.problems)
        for name, raw in usage.items():
            with contextlib.suppress(KeyError, TypeError, ValueError, OverflowError):
                self.usage[name] = Usage(str(raw["period"]), int(raw["bytes"]))
        return self

    def choice(self, name: str) -> LinkChoice:
        return self.choices.setdefault(name, LinkChoice())

    def added(self) -> list[str]:
        """The interfaces the user made links (braid links add), by name."""
        return sorted(name for name, choice in self.choices.items() if choice.added)

    def save_choices(self) -> None:
        write_json(
            self.state_dir / LINKS_FILE,
            {
                "version": FORMAT_VERSION,
                "links": {name: c.to_json() for name, c in sorted(self.choices.items())},
            },
        )

    def save_usage(self) -> None:
        write_json(
            self.state_dir / USAGE_FILE,
            {
                "version": FORMAT_VERSION,
                "usage": {name: asdict(u) for name, u in sorted(self.usage.items())},
            },
        )

    def count(self, name: str, nbytes: int, now: float | None = None) -> int:
        """Add traffic to the link's usage in the current period; returns the period's total."""
        cap = self.choice(name).cap
        period = cap.period_key(now) if cap else "uncapped"
        usage = self.usage.get(name)
        if usage is None or usage.period != period:
            usage = self.usage[name] = Usage(period)
        usage.bytes += max(0, nbytes)
        return usage.bytes

    def used(self, name: str) -> int:
        usage = self.usage.get(name)
        cap = self.choice(name).cap
        if usage is None or (cap is not None and usage.period != cap.period_key()):
            return 0
        return usage.bytes
