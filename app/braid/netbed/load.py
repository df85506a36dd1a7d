"""Many concurrent HTTP downloads through a SOCKS5 proxy, each checked byte for byte.

Used by the load test and the soak benchmark:

    python -m braid.netbed.load --socks 127.0.0.1:1080 --host 198.19.0.1 --connections 500

Prints one JSON object: how many downloads completed intact, how many failed and why.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import json
import random
import socket
import struct
import sys
import time

from braid.netbed.payload import expected_sha256


async def _socks_connect(
    proxy: tuple[str, int], host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*proxy)
    writer.write(b"\x05\x01\x00")
    if await reader.readexactly(2) != b"\x05\x00":
        raise ConnectionError("the proxy refused the greeting")
    try:
        ip = ipaddress.ip_address(host)
        atyp = b"\x01" if ip.version == 4 else b"\x04"
        target = atyp + ip.packed
    except ValueError:
        target = b"\x03" + bytes([len(host)]) + host.encode()
    writer.write(b"\x05\x01\x00" + target + struct.pack("!H", port))
    head = await reader.readexactly(4)
    if head[1] != 0:
        raise ConnectionError(f"the proxy answered {head[1]}")
    skip = {1: 4, 4: 16}.get(head[3])
    if skip is None:
        skip = (await reader.readexactly(1))[0]
    await reader.readexactly(skip + 2)
    return reader, writer


class Gauge:
    """How many downloads are open at once, and the most there ever were."""

    def __init__(self) -> None:
        self.open = 0
        self.peak = 0

    def __enter__(self) -> Gauge:
        self.open += 1
        self.peak = max(self.peak, self.open)
        return self

    def __exit__(self, *exc: object) -> None:
        self.open -= 1


async def fetch(
    proxy: tuple[str, int], host: str, port: int, size: int, seed: str, gauge: Gauge | None = None
) -> str | None:
    """Download and check one payload; None when intact, else what went wrong."""
    try:
        reader, writer = await _socks_connect(proxy, host, port)
        with gauge or Gauge():
            return await _download(reader, writer, host, size, seed)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        return f"{type(exc).__name__}: {exc}"


async def _download(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, size: int, seed: str
) -> str | None:
    try:
        writer.write(
            f"GET /bytes/{size}?seed={seed} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        )
        header = await reader.readuntil(b"\r\n\r\n")
        status_line = header.split(b"\r\n", 1)[0]
        if b" 200 " not in status_line:
            return f"HTTP status: {status_line!r}"
        digest = hashlib.sha256()
        received = 0
        while True:
            data = await reader.read(1 << 16)
            if not data:
                break
            digest.update(data)
            received += len(data)
        if received != size:
            return f"{received} of {size} bytes"
        if digest.hexdigest() != expected_sha256(size, seed):
            return "SHA-256 mismatch"
        return None
    finally:
        writer.close()


async def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    proxy_host, _, proxy_port = args.socks.rpartition(":")
    proxy = (proxy_host.strip("[]"), int(proxy_port))
    started = time.monotonic()
    gauge = Gauge()
    jobs = [
        asyncio.wait_for(
            fetch(
                proxy,
                args.host,
                args.port,
                rng.randrange(1, args.max_bytes),
                f"load-{args.seed}-{i}",
                gauge,
            ),
            args.timeout,
        )
        for i in range(args.connections)
    ]
    outcomes = await asyncio.gather(*jobs, return_exceptions=True)
    errors = [repr(o) if isinstance(o, BaseException) else o for o in outcomes if o is not None]
    return {
        "connections": args.connections,
        "ok": args.connections - len(errors),
        "failed": len(errors),
        "errors": errors[:10],
        "peak_open": gauge.peak,
        "elapsed": round(time.monotonic() - started, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socks", required=True, help="SOCKS5 proxy HOST:PORT")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--max-bytes", type=int, default=1 << 20)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    socket.setdefaulttimeout(args.timeout)
    report = asyncio.run(run(args))
    print(json.dumps(report))
    return 0 if report["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
