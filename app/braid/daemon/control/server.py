"""The control socket: newline-delimited JSON, callers identified by SO_PEERCRED.

Root, the daemon's own user and members of the ``braid`` group may change
things; anyone else may only read status. Connections are capped per user and in all (root
keeps a reserve), and one that neither subscribes nor asks anything for a while is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from braid.daemon import limits
from braid.protocol import control
from braid.protocol.control import ControlError, ErrorCode

log = logging.getLogger(__name__)

OPERATOR_GROUP = "braid"


@dataclass(frozen=True)
class Caller:
    pid: int
    uid: int
    gid: int
    may_change: bool

    def describe(self) -> str:
        try:
            name = pwd.getpwuid(self.uid).pw_name
        except KeyError:
            name = str(self.uid)
        return f"{name} (uid {self.uid}, pid {self.pid})"


def peer_caller(sock: socket.socket) -> Caller:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Caller(pid, uid, gid, may_change=is_operator(uid, gid))


def is_operator(uid: int, gid: int) -> bool:
    if uid in (0, os.geteuid()):
        return True
    try:
        group = grp.getgrnam(OPERATOR_GROUP)
    except KeyError:
        return False
    if gid == group.gr_gid:
        return True
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return False
    return group.gr_gid in os.getgrouplist(user.pw_name, user.pw_gid)


Handler = Callable[[Caller, dict[str, Any]], Awaitable[Any]]


class ControlServer:
    """Dispatches requests to handlers; ``changes`` lists the commands that need an operator."""

    def __init__(
        self,
        path: Path,
        handlers: dict[str, Handler],
        changes: set[str],
        streams: frozenset[str] = frozenset({"subscribe"}),
        caps: limits.ConnectionCaps | None = None,
        idle: float = limits.CONTROL_IDLE,
    ) -> None:
        self.path = path
        self._handlers = handlers
        self._changes = changes
        # After one of these commands the connection carries events: it is never idle.
        self._streams = streams
        self.caps = caps or limits.ConnectionCaps(
            "control socket",
            per_user=limits.CONTROL_PER_USER,
            total=limits.CONTROL_TOTAL,
            root_reserve=limits.CONTROL_ROOT_RESERVE,
        )
        self._idle = idle
        self._throttled = limits.Throttled(log)  # any local user can make these lines
        self._server: asyncio.base_events.Server | None = None
        self._clients: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a socket left by a crashed run
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self.path), limit=control.MAX_LINE
        )
        os.chmod(self.path, 0o666)  # anyone may connect; what they may do is checked per request
        log.info("control socket at %s", self.path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)
        with contextlib.suppress(OSError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            caller = peer_caller(writer.get_extra_info("socket"))
        except OSError:
            writer.transport.abort()
            return
        if not self.caps.admit(caller.uid):
            writer.write(
                control.error(
                    None,
                    ErrorCode.FAILED,
                    f"too many connections to braidd from uid {caller.uid} (at most "
                    f"{self.caps.per_user} at once); close some and try again",
                )
            )
            writer.transport.close()  # sends what was written, then closes; never waits
            return
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        streaming = False
        try:
            while True:
                try:
                    async with asyncio.timeout(None if streaming else self._idle):
                        line = await reader.readline()
                except ValueError:  # longer than the limit
                    writer.write(
                        control.error(None, ErrorCode.BAD_REQUEST, "request line too long")
                    )
                    break
                except TimeoutError:
                    break  # idle: the descriptor is worth more than the connection
                if not line:
                    break
                if not line.strip():
                    continue
                reply, command = await self._dispatch(caller, line, writer)
                streaming = streaming or command in self._streams
                writer.write(reply)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.caps.release(caller.uid)
            self._clients.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _dispatch(
        self, caller: Caller, line: bytes, writer: asyncio.StreamWriter
    ) -> tuple[bytes, str | None]:
        """The reply to one request line, and the command it ran (None if it ran none)."""
        request_id = None
        command = None
        try:
            request = control.decode_request(line)
            request_id = request.get("id")
            command = request["cmd"]
            handler = self._handlers.get(command)
            if handler is None:
                raise ControlError(ErrorCode.UNKNOWN_COMMAND, f"unknown command {command!r}")
            if command in self._changes and not caller.may_change:
                self._throttled(
                    ("forbidden", caller.uid),
                    logging.WARNING,
                    "refused %s from %s: not an operator",
                    command,
                    caller.describe(),
                )
                raise ControlError(
                    ErrorCode.FORBIDDEN,
                    f"only root and members of the '{OPERATOR_GROUP}' group may {command}; "
                    f"ask an administrator to run: usermod -aG {OPERATOR_GROUP} <you> "
                    "(then log in again)",
                )
            request["_writer"] = writer
            result = await handler(caller, request)
            return control.ok(request_id, result), command
        except ControlError as exc:
            return control.error(request_id, exc.code, exc.message), None
        except Exception as exc:  # a bug must not take the daemon down
            log.exception("control request failed")
            return control.error(request_id, ErrorCode.FAILED, f"internal error: {exc}"), None
