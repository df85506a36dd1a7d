"""The control protocol's client core, shared by the command line and the tray: no I/O."""

from __future__ import annotations

import pytest

from braid.protocol import control
from braid.protocol.client_core import (
    MAX_INCOMING_LINE,
    ClientCore,
    Garbage,
    Progress,
    Pushed,
    Reply,
)
from braid.protocol.control import ControlError


def test_replies_match_their_requests_across_split_reads_and_events_between() -> None:
    core = ClientCore()
    first, data = core.request("status")
    assert control.decode_request(data[:-1])["cmd"] == "status"
    second, _ = core.request("set-link", link="eth0", priority="never")
    stream = (
        control.encode({"event": "sample", "state": "connected"})
        + control.error(second, "invalid-argument", "no link 'eth0'")
        + control.ok(first, {"state": "connected"})
        + control.ok(99, {"stray": True})  # answers nothing this client asked
    )
    items = []
    for i in range(0, len(stream), 7):  # in small pieces, as a socket may deliver them
        items += core.receive(stream[i : i + 7])
    assert items[0] == Pushed({"v": 1, "event": "sample", "state": "connected"})
    assert items[1] == Reply(
        second, "set-link", False, code="invalid-argument", message="no link 'eth0'"
    )
    assert items[2].unwrap() == {"state": "connected"} and items[2].cmd == "status"
    assert len(items) == 3 and core.pending == {}
    with pytest.raises(ControlError, match="no link"):
        items[1].unwrap()


def test_progress_comes_before_the_answer_and_keeps_the_request_pending() -> None:
    core = ClientCore()
    asked, _ = core.request("speed-test")
    stream = (
        control.progress(asked, {"step": 1, "steps": 6, "link": "eth0"})
        + control.progress(asked, {"step": 2, "steps": 6, "link": "eth0"})
        + control.ok(asked, {"links": []})
    )
    items = core.receive(stream)
    assert items[:2] == [
        Progress(asked, "speed-test", {"step": 1, "steps": 6, "link": "eth0"}),
        Progress(asked, "speed-test", {"step": 2, "steps": 6, "link": "eth0"}),
    ]
    assert items[2] == Reply(asked, "speed-test", True, {"links": []})
    assert core.pending == {}


def test_garbage_and_overlong_lines_are_reported_not_raised() -> None:
    core = ClientCore()
    assert core.receive(b"not json\n") == [
        Garbage("bad-request", "the daemon sent something that is not JSON")
    ]
    out = core.receive(b"x" * (MAX_INCOMING_LINE + 1))
    assert isinstance(out[0], Garbage) and "overlong" in out[0].message


def test_a_lost_connection_returns_the_unanswered_requests() -> None:
    core = ClientCore()
    ids = [core.request("up")[0], core.request("down")[0]]
    core.receive(b'{"v": 1, "id": ')  # half a line
    assert core.lost() == ids
    assert core.pending == {} and core.receive(b"\n") == []
