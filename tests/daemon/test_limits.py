"""Local limits: connection caps per user, the idle control connection, the open-files limit,
the throttled accept-error log, and who owns a local TCP socket. No root needed, except for the
socket-owner test, which runs in a namespace of its own."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from braid.daemon import limits
from braid.daemon.control.server import ControlServer
from braid.daemon.limits import ConnectionCaps, Throttled

USER = 65534


def test_a_user_gets_at_most_per_user_and_others_still_get_in():
    caps = ConnectionCaps("test", per_user=3, total=10, root_reserve=2)
    assert [caps.admit(USER) for _ in range(5)] == [True, True, True, False, False]
    assert caps.admit(USER + 1)
    assert caps.open_by(USER) == 3 and caps.count == 4 and caps.refused == 2
    caps.release(USER)
    assert caps.admit(USER)


def test_the_reserve_is_roots_alone():
    caps = ConnectionCaps("test", per_user=100, total=10, root_reserve=2)
    admitted = sum(caps.admit(1000 + i % 4) for i in range(20))
    assert admitted == 8
    assert caps.admit(None) is False  # an unknown owner is not root
    assert caps.admit(0) and caps.admit(0)
    assert caps.admit(0) is False  # the total binds root too
    assert caps.count == 10


def test_an_unknown_owner_is_one_user():
    caps = ConnectionCaps("test", per_user=2, total=10, root_reserve=2)
    assert [caps.admit(None) for _ in range(3)] == [True, True, False]


def test_release_never_goes_below_zero():
    caps = ConnectionCaps("test", per_user=2, total=4, root_reserve=1)
    caps.release(USER)
    assert caps.count == 0 and caps.open_by(USER) == 0


def test_bad_caps_are_refused():
    with pytest.raises(ValueError):
        ConnectionCaps("test", per_user=1, total=4, root_reserve=4)


def test_socks_caps_follow_the_open_files_limit():
    caps = limits.socks_caps()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert 2 * caps.total <= max(soft - limits.RESERVED_DESCRIPTORS, 128)
    assert caps.per_user <= caps.total - caps.root_reserve


def test_throttled_logs_once_a_while_then_says_how_many_were_held(caplog):
    logger = logging.getLogger("braid.test.throttled")
    throttled = Throttled(logger, every=0.2)
    with caplog.at_level(logging.INFO, logger="braid.test.throttled"):
        for _ in range(1000):
            throttled("k", logging.WARNING, "refused %s", "x")
        throttled("other", logging.WARNING, "other key")
        records = [r.getMessage() for r in caplog.records]
        assert records == ["refused x", "other key"]
        import time

        time.sleep(0.25)
        throttled("k", logging.WARNING, "refused %s", "y")
    assert caplog.records[-1].getMessage().startswith("refused y (999 more like it")


def test_the_soft_open_files_limit_is_raised_to_the_hard_one():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= 256:
        pytest.skip("the hard open-files limit is too low to lower the soft one below it")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
        assert limits.raise_nofile() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_accept_errors_are_logged_once_a_while(caplog):
    """asyncio's own report of a failed accept() goes through the throttle; anything else does
    not."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        limits.throttle_accept_errors(loop)
        listener = socket.socket()
        try:
            for _ in range(500):
                loop.call_exception_handler(
                    {
                        "message": limits.ACCEPT_ERROR,
                        "exception": OSError(24, "Too many open files"),
                        "socket": listener,
                    }
                )
            loop.call_exception_handler({"message": "something else"})
        finally:
            listener.close()

    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    accept = [r for r in caplog.records if "cannot accept" in r.getMessage()]
    assert len(accept) == 1, [r.getMessage() for r in caplog.records]
    assert "Too many open files" in accept[0].getMessage()
    assert any(r.getMessage() == "something else" for r in caplog.records)


# -- the control socket, for real on a Unix socket ---------------------------------------------


async def _status(caller, request) -> dict:
    return {"state": "ok"}


async def _subscribe(caller, request) -> dict:
    return {"interval": 1}


def _server(path: Path, per_user: int = 3, idle: float = 30.0) -> ControlServer:
    caps = ConnectionCaps("control socket", per_user=per_user, total=8, root_reserve=2)
    handlers = {"status": _status, "subscribe": _subscribe}
    return ControlServer(path, handlers, changes=set(), caps=caps, idle=idle)


async def _call(path: Path, cmd: str = "status", keep: bool = False):
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(json.dumps({"v": 1, "id": 1, "cmd": cmd}).encode() + b"\n")
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 5)
    if not keep:
        writer.close()
        return json.loads(line)
    return json.loads(line), reader, writer


def test_the_control_socket_caps_connections_per_user_and_in_all(tmp_path: Path):
    path = tmp_path / "control.sock"
    # Root is held only by the total (8); anyone else by the per-user cap (3) first.
    admitted = 8 if os.geteuid() == 0 else 3

    async def main() -> None:
        server = _server(path, per_user=3)
        await server.start()
        held = [await asyncio.open_unix_connection(str(path)) for _ in range(10)]
        try:
            await asyncio.sleep(0.1)
            closed = 0
            for reader, _writer in held:
                try:
                    line = await asyncio.wait_for(reader.readline(), 0.2)
                except TimeoutError:
                    continue  # admitted: it waits for a request
                assert b"too many connections" in line, line
                assert await reader.read() == b""
                closed += 1
            assert closed == 10 - admitted
            assert server.caps.count == admitted
        finally:
            for _reader, writer in held:
                writer.close()
        await asyncio.sleep(0.1)
        assert server.caps.count == 0
        assert (await _call(path))["result"] == {"state": "ok"}
        await server.stop()

    asyncio.run(main())


def test_an_idle_control_connection_is_closed_but_a_subscriber_is_not(tmp_path: Path):
    path = tmp_path / "control.sock"

    async def main() -> None:
        server = _server(path, idle=0.3)
        await server.start()
        silent_reader, silent = await asyncio.open_unix_connection(str(path))
        _, asked_reader, asked = await _call(path, "status", keep=True)
        _, sub_reader, sub = await _call(path, "subscribe", keep=True)
        # A request line that never ends is idle too.
        _, slow = await asyncio.open_unix_connection(str(path))
        slow.write(b'{"v": 1, "cmd": "sta')
        await asyncio.sleep(0.1)
        assert server.caps.count == 4
        assert await asyncio.wait_for(silent_reader.read(), 2) == b""
        assert await asyncio.wait_for(asked_reader.read(), 2) == b""
        await asyncio.sleep(0.5)
        assert server.caps.count == 1  # the subscriber
        sub.write(json.dumps({"v": 1, "id": 2, "cmd": "status"}).encode() + b"\n")
        assert json.loads(await asyncio.wait_for(sub_reader.readline(), 2))["id"] == 2
        for writer in (silent, asked, sub, slow):
            writer.close()
        await server.stop()

    asyncio.run(main())


# -- who owns a local TCP socket ---------------------------------------------------------------

OWNER_PROBE = textwrap.dedent(
    """
    import encodings.idna, json, os, socket
    from braid.daemon.limits import SocketOwners
    results = {}
    cases = (
        (socket.AF_INET, "127.0.0.1", socket.AF_INET, "127.0.0.1"),
        (socket.AF_INET6, "::1", socket.AF_INET6, "::1"),
        (socket.AF_INET6, "::", socket.AF_INET, "127.0.0.1"),  # dual stack: the client mapped
    )
    for family, host, client_family, client_host in cases:
        srv = socket.socket(family)
        srv.bind((host, 0))
        srv.listen()
        pid = os.fork()
        if pid == 0:
            os.setgid(65534)
            os.setuid(65534)
            c = socket.socket(client_family)
            c.connect((client_host, srv.getsockname()[1]))
            c.recv(1)
            os._exit(0)
        conn, peer = srv.accept()
        owners = SocketOwners()
        results[host] = [
            owners.tcp_owner(peer[:2], conn.getsockname()[:2]),
            owners.tcp_owner(conn.getsockname()[:2], peer[:2]),
            owners.tcp_owner((host, 9), (host, 10)),
        ]
        conn.send(b"x")
        os.waitpid(pid, 0)
    print(json.dumps(results))
    """
)


def test_the_owner_of_a_local_tcp_socket_is_found(empty_netns: str):
    from braid.netbed.world import child_env

    done = subprocess.run(
        ["ip", "netns", "exec", empty_netns, sys.executable, "-c", OWNER_PROBE],
        capture_output=True,
        text=True,
        timeout=30,
        env=child_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert results == {
        "127.0.0.1": [USER, 0, None],
        "::1": [USER, 0, None],
        "::": [USER, 0, None],
    }
