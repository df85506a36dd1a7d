"""The services hosted "on the internet" of the test world.

Run inside the world's ``inet`` namespace as ``python -m braid.netbed.target --log FILE``:

* HTTP/1.1 on port 80 (and on each ``--extra-port``, e.g. 443 standing for HTTPS), IPv4 and
  IPv6 (one dual-stack socket per port):

  - ``GET /bytes/<n>?seed=<s>`` streams the first n bytes of the deterministic stream of
    :mod:`braid.netbed.payload` (check with :func:`expected_sha256`), with Content-Length;
  - ``POST /upload`` reads the body (Content-Length) and answers ``{"bytes": n, "sha256": hex}``;
  - ``GET /health`` answers ``ok``;
  - ``GET /page/<n>?size=<bytes>&v=<tag>`` answers an HTML page loading n scripts
    ``/script/<i>.js?size=<bytes>&v=<tag>`` in its head (``tag``, any text, busts caches), each a
    valid JavaScript file of exactly that size (at least :data:`SCRIPT_MIN`): it counts itself in
    ``window.braidScripts`` and is filled to size with a comment. Both are sent ``no-store``.

* UDP echo on port 7 (RFC 862), IPv4 and IPv6; with ``--quic-port``, a UDP responder that
  answers every datagram with ``quic`` (standing for HTTP/3). Replies leave from the address the
  datagram was sent to, so connected clients accept them.

* With ``--dns ADDR`` (repeatable), the DNS server of :mod:`braid.netbed.dns` on UDP and TCP
  port 53 of those addresses.

* An access log: one JSON object per line and per HTTP request (time, client, port, server_port,
  method, path, status, bytes moved, duration). ``--udp-log`` gets one line per datagram of the
  UDP services (time, client, port, service, server_port, bytes), ``--dns-log`` one per query.

It prints ``ready`` on standard output once every socket is listening.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, quote, urlsplit

from braid.netbed.dns import DnsServer, braid_zone
from braid.netbed.payload import chunks, expected_sha256

__all__ = [
    "AccessLog",
    "TargetServer",
    "UdpEcho",
    "UdpResponder",
    "expected_sha256",
    "main",
    "watch_stdin",
]

log = logging.getLogger(__name__)

_BYTES_PATH = re.compile(r"^/bytes/(\d+)$")
_PAGE_PATH = re.compile(r"^/page/(\d+)$")
_SCRIPT_PATH = re.compile(r"^/script/(\d+)\.js$")
#: What each script of a page runs; the rest of the file is a comment.
SCRIPT_CODE = b"window.braidScripts = (window.braidScripts || 0) + 1;\n"
SCRIPT_MIN = len(SCRIPT_CODE) + len(b"/**/\n")
#: Script size of a page when its URL gives none.
DEFAULT_SCRIPT_SIZE = 70_000
#: At most this many scripts per page, and this large each.
MAX_SCRIPTS = 10_000
MAX_SCRIPT_SIZE = 64 << 20
#: Idle or stalled connections are dropped after this long, so a blackholed client does not
#: pin a thread forever.
CONNECTION_TIMEOUT = 60.0
READ_CHUNK = 1 << 20


def plain_address(address: str) -> str:
    """``::ffff:198.18.1.2`` (how a dual-stack socket shows IPv4 peers) -> ``198.18.1.2``."""
    return address[7:] if address.startswith("::ffff:") and "." in address else address


def script_body(size: int) -> bytes:
    """A JavaScript file of ``max(size, SCRIPT_MIN)`` bytes: :data:`SCRIPT_CODE`, then a comment
    filled with text to size."""
    filler = max(0, size - SCRIPT_MIN)
    line = b"lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor\n"
    text = (line * (filler // len(line) + 1))[:filler]
    return SCRIPT_CODE + b"/*" + text + b"*/\n"


def page_html(n: int, size: int, tag: str = "") -> bytes:
    """The HTML page of ``GET /page/<n>``: ``n`` scripts of ``size`` bytes in its head."""
    query = f"size={size}" + (f"&v={quote(tag, safe='')}" if tag else "")
    scripts = "".join(f'<script src="/script/{i}.js?{query}"></script>\n' for i in range(n))
    return (
        '<!doctype html>\n<html><head><meta charset="utf-8">'
        f"<title>{n} scripts of {size} bytes</title>\n{scripts}</head>\n"
        f"<body><p>{n} scripts of {size} bytes</p></body></html>\n"
    ).encode()


def _query_int(query: dict[str, list[str]], name: str, default: int) -> int | None:
    """``name`` from a parsed query string as an int; None if it is not a number."""
    value = query.get(name, [str(default)])[0]
    return int(value) if value.isdigit() else None


class AccessLog:
    """Appends one JSON line per entry; safe to call from many threads."""

    def __init__(self, stream: IO[str] | None) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def write(self, **entry: Any) -> None:
        if self._stream is None:
            return
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        with self._lock:
            if self._stream.closed:
                return
            self._stream.write(line)
            self._stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._stream is not None:
                self._stream.close()


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
            server_port=self.server.server_address[1],
            method=self.command,
            path=self.path,
            status=status,
            bytes=nbytes,
            duration=round(time.monotonic() - started, 6),
        )

    def _reply(
        self, status: int, body: bytes, content_type: str = "text/plain", no_store: bool = False
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if no_store:
            self.send_header("Cache-Control", "no-store")
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
            self._page_or_script(url.path, parse_qs(url.query), started)
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

    def _page_or_script(self, path: str, query: dict[str, list[str]], started: float) -> None:
        """``/page/<n>`` and ``/script/<i>.js`` (404 for anything else)."""
        page, script = _PAGE_PATH.match(path), _SCRIPT_PATH.match(path)
        if not (page and int(page.group(1)) <= MAX_SCRIPTS) and not script:
            self._reply(HTTPStatus.NOT_FOUND, b"not found\n")
            self._access(HTTPStatus.NOT_FOUND, 0, started)
            return
        size = _query_int(query, "size", DEFAULT_SCRIPT_SIZE)
        if size is None or size > MAX_SCRIPT_SIZE:
            self._reply(HTTPStatus.BAD_REQUEST, b"bad size\n")
            self._access(HTTPStatus.BAD_REQUEST, 0, started)
            return
        if page:
            body = page_html(int(page.group(1)), size, query.get("v", [""])[0])
            kind = "text/html; charset=utf-8"
        else:
            body, kind = script_body(size), "text/javascript"
        self._reply(HTTPStatus.OK, body, kind, no_store=True)
        self._access(HTTPStatus.OK, len(body), started)

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


class UdpResponder:
    """A UDP service on one dual-stack socket, served by a daemon thread: answers each datagram
    with ``reply`` (None: with the datagram itself) from the address it was sent to."""

    def __init__(
        self,
        host: str,
        port: int,
        reply: bytes | None,
        service: str = "udp",
        log: AccessLog | None = None,
    ) -> None:
        self.reply = reply
        self.service = service
        self._log = log
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((host, port))
        self.port: int = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name=f"udp-{service}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        space = socket.CMSG_SPACE(20)  # struct in6_pktinfo
        while True:
            try:
                data, ancillary, _flags, peer = self.sock.recvmsg(65535, space)
                if self._log is not None:
                    self._log.write(
                        time=round(time.time(), 6),
                        client=plain_address(peer[0]),
                        port=peer[1],
                        service=self.service,
                        server_port=self.port,
                        bytes=len(data),
                    )
                # Reply from the address the datagram went to (the default would be the address
                # of the outgoing interface, which a connected client drops).
                source = [
                    (level, kind, payload[:16] + struct.pack("=I", 0))
                    for level, kind, payload in ancillary
                    if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO
                ]
                reply = data if self.reply is None else self.reply
                self.sock.sendmsg([reply], source, 0, peer)
            except OSError as exc:
                if self.sock.fileno() < 0:
                    return
                log.debug("%s: %s", self.service, exc)

    def close(self) -> None:
        self.sock.close()


class UdpEcho(UdpResponder):
    """RFC 862 echo (see :class:`UdpResponder`)."""

    def __init__(self, host: str, port: int, log: AccessLog | None = None) -> None:
        super().__init__(host, port, None, "echo", log)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)


def watch_stdin() -> None:
    """Exit when standard input reaches its end: the world that started us is gone.

    Reads the descriptor, not ``sys.stdin``: a daemon thread blocked in a buffered read holds its
    lock, and the interpreter aborts when it cannot flush stdin at exit.
    """
    with contextlib.suppress(OSError):
        while os.read(0, 65536):
            pass
    os.kill(os.getpid(), signal.SIGTERM)


def serve_in_thread(server: ThreadingHTTPServer, poll_interval: float = 0.5) -> None:
    """``server.serve_forever`` in a daemon thread (``shutdown`` takes up to ``poll_interval``)."""
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": poll_interval}, daemon=True
    ).start()


def open_log(path: Path | None) -> AccessLog:
    """A JSON-lines log appending to ``path`` (None: a log that drops everything)."""
    return AccessLog(path.open("a", encoding="utf-8") if path else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m braid.netbed.target",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="::", help="address to listen on (default: all)")
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--echo-port", type=int, default=7)
    parser.add_argument(
        "--extra-port", type=int, action="append", default=[], help="another HTTP port (443)"
    )
    parser.add_argument("--quic-port", type=int, help="UDP port answering 'quic' (443)")
    parser.add_argument("--log", type=Path, help="access log file (JSON lines)")
    parser.add_argument("--udp-log", type=Path, help="UDP datagram log file (JSON lines)")
    parser.add_argument("--dns", action="append", default=[], help="serve DNS on this address")
    parser.add_argument("--dns-port", type=int, default=53)
    parser.add_argument("--dns-log", type=Path, help="DNS query log file (JSON lines)")
    parser.add_argument("--target-v4", default="198.19.0.1", help="files.braid.test's A record")
    parser.add_argument("--target-v6", default="2001:db8:ff::1", help="its AAAA record")
    parser.add_argument(
        "--stdin-lifeline", action="store_true", help="exit when standard input is closed"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="target: %(message)s"
    )
    signal.signal(signal.SIGTERM, _exit_on_signal)

    access, udp_log, dns_log = open_log(args.log), open_log(args.udp_log), open_log(args.dns_log)
    http = TargetServer(args.host, args.port, access)
    extra = [TargetServer(args.host, port, access) for port in args.extra_port]
    udp = [UdpEcho(args.host, args.echo_port, udp_log)]
    if args.quic_port is not None:
        udp.append(UdpResponder(args.host, args.quic_port, b"quic", "quic", udp_log))
    dns = None
    if args.dns:
        zone = braid_zone(args.target_v4, args.target_v6)
        dns = DnsServer(args.dns, args.dns_port, zone, dns_log.write).start()
    for server in extra:
        serve_in_thread(server)
    for service in udp:
        service.start()
    if args.stdin_lifeline:
        threading.Thread(target=watch_stdin, name="lifeline", daemon=True).start()
    print("ready", flush=True)
    try:
        http.serve_forever(poll_interval=0.5)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        for server in [http, *extra]:
            server.server_close()
        for service in udp:
            service.close()
        if dns is not None:
            dns.close()
        for stream in (access, udp_log, dns_log):
            stream.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
