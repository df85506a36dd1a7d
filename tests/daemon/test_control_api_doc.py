"""docs/control-api.md describes exactly the commands braidd answers and the events it sends."""

from __future__ import annotations

import re
from pathlib import Path

from braid.daemon.commands import Commands
from braid.protocol.events import EventKind

DOC = Path(__file__).resolve().parents[2] / "docs" / "control-api.md"


def rows(section: str) -> dict[str, list[str]]:
    text = DOC.read_text()
    part = text[text.index(section) :]
    part = part[: part.index("\n## ", 1)] if "\n## " in part[1:] else part
    found = {}
    for line in part.splitlines():
        match = re.match(r"\| `([a-z-]+)` \|(.*)\|$", line)
        if match:
            found[match.group(1)] = [c.strip() for c in match.group(2).split("|")]
    return found


def test_every_command_is_documented_and_nothing_else() -> None:
    documented = rows("## Commands")
    table = Commands.table(Commands.__new__(Commands))
    assert set(documented) == set(table)
    for cmd, cells in documented.items():
        who = cells[0]
        assert (who == "operator") == (cmd in Commands.CHANGES), cmd


def test_every_event_kind_is_documented_with_its_level_and_title() -> None:
    documented = rows("## Events")
    assert set(documented) == {str(kind) for kind in EventKind}
    for kind in EventKind:
        level, title = documented[str(kind)][:2]
        assert (level, title) == (str(kind.level), kind.title), kind
