"""A device on a link's LAN: the router's admin page (it stands for a printer or a NAS too).

Run inside an ISP namespace of the test world::

    python -m braid.netbed.lan --listen 198.18.1.1 --listen 2001:db8:1::1 --text "router 1" \\
        --log FILE --stdin-lifeline

``GET /`` answers the text, anything else 404. Every request is logged (JSON lines: time, client,
port, server, method, path, status) before it is answered. Prints ``ready`` once listening.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import socketserver
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from braid.netbed.target import AccessLog, open_log, plain_address, serve_in_thread, watch_stdin

log = logging.getLogger(__name__)

CONNECTION_TIMEOUT = 10.0


class _PageHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "braid-netbed-router/1"
    timeout = CONNECTION_TIMEOUT
    server: PageServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.client_address[0], *args)

    def do_GET(self) -> None:
        found = self.path.split("?", 1)[0] == "/"
        status = HTTPStatus.OK if found else HTTPStatus.NOT_FOUND
        self.server.access_log.write(
            time=round(time.time(), 6),
            client=plain_address(self.client_address[0]),
            port=self.client_address[1],
            server=self.server.server_address[0],
            method=self.command,
            path=self.path,
            status=int(status),
        )
        body = (self.server.text + "\n").encode() if found else b"not found\n"
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class PageServer(ThreadingHTTPServer):
    """Serves one page on one address (IPv4 or IPv6)."""

    daemon_threads = True

    def __init__(self, host: str, port: int, text: str, access_log: AccessLog) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.text = text
        self.access_log = access_log
        super().__init__((host, port), _PageHandler)

    def server_bind(self) -> None:
        # HTTPServer's own would look the address up in DNS (getfqdn): not here.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m braid.netbed.lan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--listen", action="append", required=True, help="address (repeatable)")
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--text", default="router")
    parser.add_argument("--log", type=Path, help="request log file (JSON lines)")
    parser.add_argument("--stdin-lifeline", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="lan: %(message)s")
    signal.signal(signal.SIGTERM, _exit_on_signal)

    access = open_log(args.log)
    servers = [PageServer(host, args.port, args.text, access) for host in args.listen]
    for server in servers:
        serve_in_thread(server)
    if args.stdin_lifeline:
        threading.Thread(target=watch_stdin, name="lifeline", daemon=True).start()
    print("ready", flush=True)
    try:
        signal.pause()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        for server in servers:
            server.server_close()
        access.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
