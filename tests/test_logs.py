"""Logging under systemd's journal and elsewhere (app/braid/logs.py)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

from braid.logs import JournalFormatter, journal_priority, reason, stderr_is_journal


def _record(level: int, msg: str, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("braid.daemon", level, __file__, 1, msg, (), exc_info)


def test_priorities_are_sd_daemons():
    assert [journal_priority(level) for level in (10, 20, 30, 40, 50)] == [7, 6, 4, 3, 2]
    assert journal_priority(25) == 6  # between INFO and WARNING: filed as info


def test_journal_lines_carry_a_priority_and_no_timestamp():
    formatter = JournalFormatter("%(levelname)s %(name)s: %(message)s")
    line = formatter.format(_record(logging.WARNING, "link wlan0 is dead"))
    assert line == "<4>WARNING braid.daemon: link wlan0 is dead"


def test_every_line_of_a_traceback_keeps_the_priority():
    formatter = JournalFormatter("%(levelname)s %(message)s")
    try:
        raise ValueError("broken state file")
    except ValueError:
        record = _record(logging.ERROR, "cannot load\nthe settings", sys.exc_info())
    lines = formatter.format(record).split("\n")
    assert len(lines) > 4
    assert all(line.startswith("<3>") for line in lines), lines
    assert lines[-1] == "<3>ValueError: broken state file"


def test_journal_stream_must_be_stderr_itself(tmp_path):
    with open(tmp_path / "stderr", "w") as stream:
        st = os.fstat(stream.fileno())
        assert stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, stream)
        # inherited by a child whose stderr was redirected elsewhere: not the journal
        assert not stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, stream)
        assert not stderr_is_journal({"JOURNAL_STREAM": "garbage"}, stream)
        assert not stderr_is_journal({}, stream)


_CHILD = """
import logging
from braid import logs
logs.setup(verbose=False)
logging.getLogger("braid.daemon").warning("server unreachable")
logging.getLogger("braid.daemon").info("connected")
logging.getLogger("braid.daemon").debug("not shown")
"""


def _run_child(tmp_path, journal: bool) -> list[str]:
    path = tmp_path / "stderr"
    with open(path, "w") as stream:
        env = dict(os.environ)
        env.pop("JOURNAL_STREAM", None)
        if journal:
            st = os.fstat(stream.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run(
            [sys.executable, "-c", _CHILD], stderr=stream, env=env, check=True, timeout=60
        )
    return path.read_text().splitlines()


def test_under_systemd_the_process_logs_the_journals_way(tmp_path):
    assert _run_child(tmp_path, journal=True) == [
        "<4>WARNING braid.daemon: server unreachable",
        "<6>INFO braid.daemon: connected",
    ]


def test_elsewhere_lines_keep_their_timestamp(tmp_path):
    lines = _run_child(tmp_path, journal=False)
    assert len(lines) == 2
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING braid.daemon: server unreachable", lines[0]
    )


def test_a_reason_is_never_empty():
    assert reason(TimeoutError()) == "no answer in time"
    assert reason(TimeoutError("the server did not answer")) == "the server did not answer"
    assert reason(ConnectionRefusedError(111, "Connection refused")) == "connection refused"
    assert reason(ConnectionResetError()) == "ConnectionResetError"
    assert reason(ValueError("bad answer")) == "bad answer"
