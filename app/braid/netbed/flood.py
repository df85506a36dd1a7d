"""Unauthenticated connections thrown at braid-server, as an attacker would: for tests and
benchmarks of the server's limits. Runs in whatever namespace its event loop runs in.

Kinds of connection:

* ``close``: connect and close at once (a port scan, or a process that wants the
  server to count failures against an address);
* ``silent``: connect and say nothing, holding the descriptor until the server
  drops it or the flood ends;
* ``garbage``: connect, send a line that is not TLS, wait for the server to hang up;
* ``token``: a full TLS handshake, then a HELLO with a wrong token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import socket
import time
from dataclasses import dataclass

from braid.protocol.tunnel import encode_hello
from braid.transport import client_tls_context

KINDS = ("close", "silent", "garbage", "token")


@dataclass
class FloodResult:
    attempts: int = 0
    connected: int = 0
    refused: int = 0  # connect() failed (the server's backlog was full, or it was down)
    dropped_by_server: int = 0  # silent ones the server hung up on before the flood ended


async def _one(
    kind: str, host: str, port: int, local: str | None, until: float, result: FloodResult
) -> None:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if kind == "token":
        try:
            async with asyncio.timeout(max(until - loop.time(), 0.1) + 5):
                reader, writer = await asyncio.open_connection(
                    host,
                    port,
                    ssl=client_tls_context(),
                    server_hostname="",
                    local_addr=(local, 0) if local else None,
                )
                result.connected += 1
                writer.write(encode_hello("wrong-" + "x" * 37))
                with contextlib.suppress(OSError):
                    await reader.read()
                writer.transport.abort()
        except (OSError, TimeoutError):
            result.refused += 1
        return
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if local:
            sock.bind((local, 0))
        try:
            async with asyncio.timeout(5):
                await loop.sock_connect(sock, (host, port))
        except (OSError, TimeoutError):
            result.refused += 1
            return
        result.connected += 1
        if kind == "close":
            return
        if kind == "garbage":
            with contextlib.suppress(OSError):
                await loop.sock_sendall(sock, b"GET / HTTP/1.0\r\n\r\n")
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(max(until - loop.time(), 0.01)):
                while await loop.sock_recv(sock, 4096):
                    pass
                if kind == "silent":
                    result.dropped_by_server += 1
    finally:
        sock.close()


async def flood(
    host: str,
    port: int,
    kind: str = "close",
    *,
    count: int | None = None,
    duration: float | None = None,
    local: str | None = None,
    concurrency: int = 100,
) -> FloodResult:
    """``count`` connections, or as many as fit in ``duration`` s, ``concurrency`` at a time.

    For ``silent`` the connections are held until ``duration`` ends (or 10 s with
    only a count), so ``concurrency`` is the number held open at once.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}")
    if count is None and duration is None:
        raise ValueError("give a count, a duration or both")
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    until = loop.time() + (duration if duration is not None else 10.0)
    result = FloodResult()
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task] = set()

    async def run_one() -> None:
        try:
            await _one(kind, host, port, local, until, result)
        finally:
            slots.release()

    try:
        while (count is None or result.attempts < count) and (
            duration is None or time.monotonic() - started < duration
        ):
            await slots.acquire()
            result.attempts += 1
            task = loop.create_task(run_one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m braid.netbed.flood HOST PORT KIND...``: the flood as a program of its own
    (so that it does not share a process, or an interpreter lock, with the client it attacks).
    Prints one JSON object per kind."""
    parser = argparse.ArgumentParser(prog="python -m braid.netbed.flood")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("kinds", nargs="+", metavar="KIND[:CONCURRENCY]")
    parser.add_argument("--count", type=int)
    parser.add_argument("--duration", type=float)
    parser.add_argument("--local", help="the source address")
    args = parser.parse_args(argv)

    async def run() -> list[FloodResult]:
        jobs = []
        for spec in args.kinds:
            kind, _, concurrency = spec.partition(":")
            jobs.append(
                flood(
                    args.host,
                    args.port,
                    kind,
                    count=args.count,
                    duration=args.duration,
                    local=args.local,
                    concurrency=int(concurrency or 100),
                )
            )
        return list(await asyncio.gather(*jobs))

    for spec, result in zip(args.kinds, asyncio.run(run()), strict=True):
        print(json.dumps({"kind": spec, **dataclasses.asdict(result)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["KINDS", "FloodResult", "flood", "main"]
