"""The control protocol between braidd and its clients (tray, command line).

Newline-delimited JSON over a Unix socket. Every message carries the protocol
version ``v``. A request is ``{"v": 1, "id": 7, "cmd": "status", ...}``; its
answer is ``{"v": 1, "id": 7, "ok": true, "result": {...}}`` or
``{"v": 1, "id": 7, "ok": false, "error": {"code": "...", "message": "..."}}``.
A long request may send ``{"v": 1, "id": 7, "progress": {...}}`` lines before its answer.
See docs/control-api.md.
"""

from __future__ import annotations

import json
from typing import Any

from braid.files import load_json

PROTOCOL_VERSION = 1
MAX_LINE = 64 * 1024
DEFAULT_SOCKET = "/run/braid/control.sock"


class ErrorCode:
    BAD_REQUEST = "bad-request"
    UNSUPPORTED_VERSION = "unsupported-version"
    UNKNOWN_COMMAND = "unknown-command"
    INVALID_ARGUMENT = "invalid-argument"
    FORBIDDEN = "forbidden"
    FAILED = "failed"


class ControlError(Exception):
    """An error to report to the other side: a code for programs, a message for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps({"v": PROTOCOL_VERSION, **message}, separators=(",", ":")).encode() + b"\n"


def decode_request(line: bytes) -> dict[str, Any]:
    """Parse and check one request line; raises ControlError with a reply-worthy message."""
    if len(line) > MAX_LINE:
        raise ControlError(ErrorCode.BAD_REQUEST, "request line too long")
    try:
        message = load_json(line)
    except ValueError:
        raise ControlError(ErrorCode.BAD_REQUEST, "request is not valid JSON") from None
    if not isinstance(message, dict):
        raise ControlError(ErrorCode.BAD_REQUEST, "request must be a JSON object")
    version = message.get("v")
    if version != PROTOCOL_VERSION:
        raise ControlError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {version!r} is not supported (this daemon speaks {PROTOCOL_VERSION})",
        )
    if not isinstance(message.get("cmd"), str):
        raise ControlError(ErrorCode.BAD_REQUEST, "request has no command (cmd)")
    return message


def ok(request_id: Any, result: Any = None) -> bytes:
    return encode({"id": request_id, "ok": True, "result": result})


def progress(request_id: Any, news: dict[str, Any]) -> bytes:
    """How a long request is getting on, sent before its answer (``speed-test``)."""
    return encode({"id": request_id, "progress": news})


def error(request_id: Any, code: str, message: str) -> bytes:
    return encode({"id": request_id, "ok": False, "error": {"code": code, "message": message}})


def decode_reply(line: bytes) -> dict[str, Any]:
    try:
        message = load_json(line)
    except ValueError:
        raise ControlError(
            ErrorCode.BAD_REQUEST, "the daemon sent something that is not JSON"
        ) from None
    if not isinstance(message, dict) or message.get("v") != PROTOCOL_VERSION:
        raise ControlError(
            ErrorCode.UNSUPPORTED_VERSION,
            "the daemon speaks another protocol version: update Braid so both sides match",
        )
    if "error" in message:  # callers read error.code and error.message as text
        error = message["error"]
        error = error if isinstance(error, dict) else {"message": error}
        message["error"] = {
            "code": str(error.get("code") or ErrorCode.FAILED),
            "message": str(error.get("message") or "the request failed"),
        }
    return message
