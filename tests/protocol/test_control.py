"""Control protocol messages: versioned JSON lines, errors that explain themselves."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from braid.protocol import control
from braid.protocol.control import ControlError, ErrorCode


def test_request_round_trip():
    line = control.encode({"id": 3, "cmd": "status"})
    assert line.endswith(b"\n")
    assert control.decode_request(line) == {"v": 1, "id": 3, "cmd": "status"}


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"not json", ErrorCode.BAD_REQUEST),
        (b"[1,2]", ErrorCode.BAD_REQUEST),
        (b'{"cmd":"status"}', ErrorCode.UNSUPPORTED_VERSION),
        (b'{"v":99,"cmd":"status"}', ErrorCode.UNSUPPORTED_VERSION),
        (b'{"v":1}', ErrorCode.BAD_REQUEST),
        (b'{"v":1,"cmd":5}', ErrorCode.BAD_REQUEST),
    ],
)
def test_bad_requests_are_errors_with_codes(line, code):
    with pytest.raises(ControlError) as info:
        control.decode_request(line)
    assert info.value.code == code
    assert info.value.message


def test_error_reply_shape():
    reply = json.loads(control.error(7, ErrorCode.FORBIDDEN, "no"))
    assert reply == {"v": 1, "id": 7, "ok": False, "error": {"code": "forbidden", "message": "no"}}


@given(st.binary(max_size=200))
def test_garbage_lines_only_raise_control_errors(data):
    with contextlib.suppress(ControlError):
        control.decode_request(data)


@pytest.mark.parametrize("decode", [control.decode_request, control.decode_reply])
def test_deeply_nested_json_is_a_control_error(decode):
    # Found by the fuzzer (tests/fuzz): json.loads raised RecursionError, which
    # braidd's dispatcher reported as an internal error instead of a bad request.
    line = b'{"v":1,"cmd":"status","id":' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert len(line) <= control.MAX_LINE
    with pytest.raises(ControlError) as info:
        decode(line)
    assert info.value.code == ErrorCode.BAD_REQUEST


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (
            {"code": "forbidden", "message": "join the braid group"},
            "forbidden",
            "join the braid group",
        ),
        ("just text", "failed", "just text"),
        ([1, 2], "failed", "[1, 2]"),
        ({"code": 7, "message": None}, "7", "the request failed"),
        (None, "failed", "the request failed"),
    ],
)
def test_error_replies_always_carry_a_text_code_and_message(error, code, message) -> None:
    line = json.dumps({"v": 1, "id": 1, "ok": False, "error": error}).encode()
    assert control.decode_reply(line)["error"] == {"code": code, "message": message}
