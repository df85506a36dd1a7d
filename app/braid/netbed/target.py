"""The services hosted "on the internet" of the test world.

Run inside the world's ``inet`` namespace as ``python -m braid.netbed.target --log FILE``:

* HTTP/1.1 on port 80, IPv4 and IPv6 (one dual-stack socket):

  - ``GET /bytes/<n>?seed=<s>`` streams the first n bytes of the deterministic stream of
    :mod:`braid.netbed.payload` (check with :func:`expected_sha256`), with Content-Length;
  - ``POST /upload`` reads the body (Content-Length) and answers ``{"bytes": n, "sha256": hex}``;
  - ``GET /health`` answers ``ok``.

* UDP echo on port 7 (RFC 862), IPv4 and IPv6.

* An access log: one JSON object per line and per HTTP request (time, client, method, path,
  status, bytes moved, duration). Echo datagrams are not logged: probes send many.

It prints ``ready`` on standard output once every socket is listening.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, urlsplit

from braid.netbed.payload import chunks, expected_sha256

__all__ = ["AccessLog", "TargetServer", "expected_sha256", "main"]

log = logging.getLogger(__name__)

_BYTES_PATH = re.compile(r"^/bytes/(\d+)$")
#: Idle or stalled connections are dropped after this long, so a blackholed client does not
#: pin a thread forever.
CONNECTION_TIMEOUT = 60.0
READ_CHUNK = 1 << 20


def plain_address(address: str) -> str:
    """``::ffff:198.18.1.2`` (how a dual-stack socket shows IPv4 peers) -> ``198.18.1.2``."""
    return address[7:] if address.startswith("::ffff:") and "." in address else address


class AccessLog:
    """Appends one JSON line per request; safe to call from many threads."""

    def __init__(self, stream: IO[str] | None) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def write(self, **entry: Any) -> None:
        if self._stream is None:
            return
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        with self._lock:
            self._stream.write(line)
            self._stream.flush()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "braid-netbed-target/1"
    timeout = CONNECTION_TIMEOUT
    server: TargetServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.client_address[0], *args)

    def _access(self, status: int, nbytes: int, started: float) -> None:
        self.server.access_log.write(
            time=round(time.time(), 6),
            client=plain_address(self.client_address[0]),
            port=self.client_address[1],
            method=self.command,
            path=self.path,
            status=status,
            bytes=nbytes,
            duration=round(time.monotonic() - started, 6),
        )

    def _reply(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        started = time.monotonic()
        url = urlsplit(self.path)
        match = _BYTES_PATH.match(url.path)
        if url.path == "/health":
            self._reply(HTTPStatus.OK, b"ok\n")
            self._access(HTTPStatus.OK, 3, started)
            return
        if not match:
            self._reply(HTTPStatus.NOT_FOUND, b"not found\n")
            self._access(HTTPStatus.NOT_FOUND, 0, started)
            return
        n = int(match.group(1))
        seed = parse_qs(url.query).get("seed", ["0"])[0]
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        sent = 0
        try:
            for block in chunks(n, seed):
                self.wfile.write(block)
                sent += len(block)
        except OSError as exc:  # the client went away or stalled past the timeout
            log.debug("GET %s aborted after %d bytes: %s", self.path, sent, exc)
            self.close_connection = True
        self._access(HTTPStatus.OK, sent, started)

    def do_POST(self) -> None:
        started = time.monotonic()
        if urlsplit(self.path).path != "/upload":
            self._reply(HTTPStatus.NOT_FOUND, b"not found\n")
            self._access(HTTPStatus.NOT_FOUND, 0, started)
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            self._reply(HTTPStatus.LENGTH_REQUIRED, b"Content-Length required\n")
            self._access(HTTPStatus.LENGTH_REQUIRED, 0, started)
            return
        left = int(length)
        digest = hashlib.sha256()
        received = 0
        buffer = bytearray(READ_CHUNK)
        view = memoryview(buffer)
        try:
            while left > 0:
                got = self.rfile.readinto(view[: min(left, READ_CHUNK)])
                if not got:
                    break
                digest.update(view[:got])
                received += got
                left -= got
        except OSError as exc:
            log.debug("POST aborted after %d bytes: %s", received, exc)
        if left > 0:
            self.close_connection = True
            self._access(HTTPStatus.BAD_REQUEST, received, started)
            return
        body = json.dumps({"bytes": received, "sha256": digest.hexdigest()}).encode()
        self._reply(HTTPStatus.OK, body, "application/json")
        self._access(HTTPStatus.OK, received, started)


class TargetServer(ThreadingHTTPServer):
    """Dual-stack threaded HTTP server (IPv4 peers arrive as IPv4-mapped addresses)."""

    address_family = socket.AF_INET6
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, host: str, port: int, access_log: AccessLog) -> None:
        self.access_log = access_log
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class UdpEcho:
    """RFC 862 echo on one dual-stack UDP socket, served by a daemon thread."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((host, port))
        self._thread = threading.Thread(target=self._serve, name="udp-echo", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(65535)
                self.sock.sendto(data, peer)
            except OSError as exc:
                if self.sock.fileno() < 0:
                    return
                log.debug("echo: %s", exc)

    def close(self) -> None:
        self.sock.close()


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _watch_stdin() -> None:
    """Exit when standard input reaches its end: the world that started us is gone."""
    while sys.stdin.buffer.read(65536):
        pass
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m braid.netbed.target",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="::", help="address to listen on (default: all)")
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--echo-port", type=int, default=7)
    parser.add_argument("--log", type=Path, help="access log file (JSON lines)")
    parser.add_argument(
        "--stdin-lifeline", action="store_true", help="exit when standard input is closed"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="target: %(message)s"
    )
    signal.signal(signal.SIGTERM, _exit_on_signal)

    stream = args.log.open("a", encoding="utf-8") if args.log else None
    http = TargetServer(args.host, args.port, AccessLog(stream))
    echo = UdpEcho(args.host, args.echo_port)
    echo.start()
    if args.stdin_lifeline:
        threading.Thread(target=_watch_stdin, name="lifeline", daemon=True).start()
    print("ready", flush=True)
    try:
        http.serve_forever(poll_interval=0.5)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        http.server_close()
        echo.close()
        if stream is not None:
            stream.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
