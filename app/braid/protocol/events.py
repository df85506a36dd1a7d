"""The events braidd publishes, declared once: their kind, level and title.

braidd sends ``{"event": KIND, "t": …, "link": NAME | null, "message": TEXT, …}`` to its
subscribers and keeps the last ones in ``status.events``. The tray colours its log by the level
and shows a bubble titled by the title for the kinds that ``notify``; the command line prints the
message. docs/control-api.md lists them (a test checks it against this table).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Level(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class EventKind(enum.StrEnum):
    """Each kind with its level, its title, and whether the tray shows a bubble for it."""

    level: Level
    title: str
    notify: bool

    def __new__(cls, value: str, level: Level, title: str, notify: bool = False) -> EventKind:
        member = str.__new__(cls, value)
        member._value_ = value
        member.level = level
        member.title = title
        member.notify = notify
        return member

    LINK_FOUND = ("link-found", Level.INFO, "A link was found")
    LINK_ADDED = ("link-added", Level.INFO, "A link was added")
    LINK_REMOVED = ("link-removed", Level.WARNING, "A link is gone")
    LINK_UP = ("link-up", Level.INFO, "A link is up")
    LINK_DOWN = ("link-down", Level.WARNING, "A link is down")
    LINK_LOST = ("link-lost", Level.WARNING, "A link stopped answering", True)
    LINK_BACK = ("link-back", Level.INFO, "A link is back", True)
    SIGN_IN_REQUIRED = ("sign-in-required", Level.WARNING, "Sign-in required", True)
    FAILOVER = ("failover", Level.WARNING, "New connections moved to another link", True)
    NO_LINK = ("no-link", Level.WARNING, "No link reaches the server", True)
    CAP_REACHED = ("cap-reached", Level.WARNING, "Data cap reached", True)
    CONNECTED = ("connected", Level.INFO, "Connected")
    SERVER_UNREACHABLE = ("server-unreachable", Level.ERROR, "Lost the server", True)
    DISCONNECTED = ("disconnected", Level.INFO, "Disconnected")
    CAPTURE_ON = ("capture-on", Level.INFO, "System-wide mode on")
    CAPTURE_OFF = ("capture-off", Level.INFO, "System-wide mode off")
    CAPTURE_FAILED = ("capture-failed", Level.ERROR, "System-wide mode could not start", True)
    SETTINGS_CHANGED = ("settings-changed", Level.INFO, "Settings changed")


@dataclass(frozen=True)
class Event:
    kind: EventKind
    link: str | None
    message: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self, t: float) -> dict[str, Any]:
        return {
            "event": str(self.kind),
            "t": t,
            "link": self.link,
            "message": self.message,
            "level": str(self.kind.level),
            "title": self.kind.title,
            **self.extra,
        }


def kind_of(message: dict) -> EventKind | None:
    """The kind of an event message, or None for a kind this version does not know."""
    try:
        return EventKind(str(message.get("event")))
    except ValueError:
        return None


__all__ = ["Event", "EventKind", "Level", "kind_of"]
