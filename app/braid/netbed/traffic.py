"""Traffic clients for the test world: HTTP download/upload (direct or through SOCKS5) and UDP echo.

They use plain blocking sockets, deliberately independent of the product's code, so that a test
measures the product and not itself. Each transfer reports the SHA-256 of what was moved (to be
compared with :func:`braid.netbed.payload.expected_sha256`), the time to the first byte and the
cumulative byte count every ``tick`` seconds, also while the transfer stalls (that is when a
failover benchmark needs the samples most).

As a program (run inside a namespace, e.g. ``world.run("laptop", ...)``)::

    python -m braid.netbed.traffic download 198.19.0.1 --bytes 10M [--device eth0] [--progress]
    python -m braid.netbed.traffic upload files.braid.test --bytes 10M --socks 127.0.0.1:1080
    python -m braid.netbed.traffic echo 2001:db8:ff::1 --count 20 --interval 0.05
    python -m braid.netbed.traffic fetch-many 198.19.0.1 --connections 6 --objects 60 \
        --sizes 8k,30k,120k --socks 127.0.0.1:1080

``fetch-many`` is what a browser does with one site over HTTP/1.1: a few persistent connections
(keep-alive) that fetch many objects between them, each taking the next object as it finishes one.

It prints one JSON object with the result (after one JSON line per tick with ``--progress``) and
exits with status 0 when the transfer completed and its digest matched, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import json
import os
import re
import select
import socket
import statistics
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from braid.netbed.payload import CHUNK, chunks, expected_sha256

IPPROTO_MPTCP = 262
#: progress(cumulative_bytes, wall_clock_time)
Progress = Callable[[int, float], None]

SOCKS_REPLIES = {
    1: "general SOCKS server failure",
    2: "connection not allowed by ruleset",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused",
    6: "TTL expired",
    7: "command not supported",
    8: "address type not supported",
}


class TransferError(Exception):
    """A transfer failed; ``result`` holds what was measured until then."""

    def __init__(self, message: str, result: TransferResult | None = None) -> None:
        super().__init__(message)
        self.result = result


class SocksError(TransferError):
    """The SOCKS5 proxy refused or garbled the request."""


@dataclass
class TransferResult:
    """What one download or upload measured. Times are seconds since the transfer started."""

    direction: str
    host: str
    port: int
    requested: int
    bytes: int = 0
    sha256: str = ""
    expected_sha256: str = ""
    connect_time: float | None = None
    ttfb: float | None = None
    elapsed: float = 0.0
    local: str = ""
    remote_reported: dict[str, Any] | None = None
    ticks: list[tuple[float, int]] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.bytes == self.requested
            and bool(self.expected_sha256)
            and self.sha256 == self.expected_sha256
        )

    @property
    def mbit_per_s(self) -> float:
        """Average rate over the whole transfer (connection set-up included)."""
        return self.bytes * 8 / self.elapsed / 1e6 if self.elapsed > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        data["mbit_per_s"] = round(self.mbit_per_s, 3)
        return data


@dataclass
class EchoResult:
    """Round trips of a UDP echo run; ``rtts_ms`` holds one entry per answered datagram."""

    host: str
    port: int
    sent: int = 0
    rtts_ms: list[float] = field(default_factory=list)

    @property
    def received(self) -> int:
        return len(self.rtts_ms)

    @property
    def loss(self) -> float:
        return 1.0 - self.received / self.sent if self.sent else 0.0

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.rtts_ms) if self.rtts_ms else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(received=self.received, loss=self.loss, median_ms=self.median_ms)
        return data


# --- sockets -----------------------------------------------------------------------------------


def _is_v6_literal(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def open_connection(
    host: str,
    port: int,
    *,
    bind: str | None = None,
    device: str | None = None,
    timeout: float = 10.0,
    mptcp: bool = False,
) -> socket.socket:
    """Connect a TCP (or MPTCP) socket, optionally bound to a source address and/or device.

    ``device`` sets SO_BINDTODEVICE: in the laptop namespace, which has only main-table routes,
    this is what sends a connection out of a given link (a bound address alone would still leave
    by the lowest-metric default route and be dropped by the ISP's reverse-path filter).
    """
    family = socket.AF_UNSPEC
    if bind is not None:
        family = socket.AF_INET6 if _is_v6_literal(bind) else socket.AF_INET
    infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    last_error: OSError | None = None
    for af, kind, _proto, _name, address in infos:
        sock = socket.socket(af, kind, IPPROTO_MPTCP if mptcp else socket.IPPROTO_TCP)
        try:
            if device:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
            if bind is not None:
                sock.bind((bind, 0))
            sock.settimeout(timeout)
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            last_error = exc
    raise last_error or OSError(f"no address for {host}")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        got = sock.recv(n - len(data))
        if not got:
            raise SocksError("SOCKS5 proxy closed the connection")
        data += got
    return bytes(data)


def socks5_connect(sock: socket.socket, host: str, port: int) -> None:
    """Ask the SOCKS5 proxy at the other end of ``sock`` to CONNECT to host:port (RFC 1928).

    Only the "no authentication" method is offered. ``host`` may be an IPv4 or IPv6 literal or a
    name (sent as a name: the proxy resolves it).
    """
    sock.sendall(b"\x05\x01\x00")
    if _recv_exact(sock, 2) != b"\x05\x00":
        raise SocksError("SOCKS5 proxy refused the no-authentication method")
    try:
        ip = ipaddress.ip_address(host)
        address = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
    except ValueError:
        name = host.encode("idna")
        if len(name) > 255:
            raise SocksError(f"name too long for SOCKS5: {host}") from None
        address = b"\x03" + bytes([len(name)]) + name
    sock.sendall(b"\x05\x01\x00" + address + struct.pack("!H", port))
    version, reply, _reserved, atyp = _recv_exact(sock, 4)
    if version != 5:
        raise SocksError(f"not a SOCKS5 reply (version {version})")
    if reply != 0:
        raise SocksError(f"SOCKS5 CONNECT failed: {SOCKS_REPLIES.get(reply, f'reply {reply}')}")
    if atyp == 1:
        _recv_exact(sock, 4 + 2)
    elif atyp == 4:
        _recv_exact(sock, 16 + 2)
    elif atyp == 3:
        _recv_exact(sock, _recv_exact(sock, 1)[0] + 2)
    else:
        raise SocksError(f"bad address type {atyp} in SOCKS5 reply")


def _socks5_associate(proxy: tuple[str, int]) -> tuple[socket.socket, tuple[str, int]]:
    """A UDP association with the SOCKS5 proxy: its control connection and the relay address."""
    control = socket.create_connection(proxy, timeout=10)
    try:
        control.sendall(b"\x05\x01\x00")
        if _recv_exact(control, 2) != b"\x05\x00":
            raise SocksError("SOCKS5 proxy refused the no-authentication method")
        control.sendall(b"\x05\x03\x00\x01" + bytes(6))
        version, reply, _reserved, atyp = _recv_exact(control, 4)
        if version != 5 or reply != 0:
            raise SocksError(f"SOCKS5 UDP ASSOCIATE failed: {SOCKS_REPLIES.get(reply, reply)}")
        size = 4 if atyp == 1 else 16
        host = socket.inet_ntop(
            socket.AF_INET if atyp == 1 else socket.AF_INET6, _recv_exact(control, size)
        )
        port = struct.unpack("!H", _recv_exact(control, 2))[0]
    except BaseException:
        control.close()
        raise
    return control, (host, port)


def _host_header(host: str, port: int) -> str:
    shown = f"[{host}]" if _is_v6_literal(host) else host
    return shown if port == 80 else f"{shown}:{port}"


# --- HTTP transfers ----------------------------------------------------------------------------


class _Meter:
    """Ticks and stall detection shared by download and upload."""

    def __init__(
        self,
        result: TransferResult,
        started: float,
        tick: float,
        idle_timeout: float,
        progress: Progress | None,
    ) -> None:
        self.result, self.started, self.tick = result, started, tick
        self.idle_timeout, self.progress = idle_timeout, progress
        self.next_tick = started + tick
        self.last_progress = started

    def update(self, count: int) -> None:
        """Account ``count`` new bytes (0 after a timed-out wait); raise when stalled too long."""
        now = time.monotonic()
        if count:
            self.result.bytes += count
            self.last_progress = now
        elif now - self.last_progress > self.idle_timeout:
            raise TransferError(f"no progress for {self.idle_timeout:g} s", self.result)
        if now >= self.next_tick:
            self.emit(now)
            # Skip missed ticks rather than emitting a burst of them after a long blocking call.
            while self.next_tick <= now:
                self.next_tick += self.tick

    def emit(self, now: float) -> None:
        self.result.ticks.append((round(now - self.started, 6), self.result.bytes))
        if self.progress is not None:
            self.progress(self.result.bytes, time.time())


def _read_head(sock: socket.socket, meter: _Meter) -> tuple[int, dict[str, str], bytes]:
    """Read an HTTP response head; return status, lower-cased headers, and body bytes read."""
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            got = sock.recv(65536)
        except TimeoutError:
            meter.update(0)
            continue
        if not got:
            raise TransferError("connection closed before the response", meter.result)
        if meter.result.ttfb is None:
            meter.result.ttfb = round(time.monotonic() - meter.started, 6)
        data += got
        if len(data) > 65536:
            raise TransferError("response head too long", meter.result)
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("iso-8859-1").split("\r\n")
    match = re.match(r"HTTP/1\.[01] (\d{3})", lines[0])
    if not match:
        raise TransferError(f"bad status line {lines[0]!r}", meter.result)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(match.group(1)), headers, body


def _connect(
    result: TransferResult,
    host: str,
    port: int,
    socks: tuple[str, int] | None,
    bind: str | None,
    device: str | None,
    timeout: float,
    mptcp: bool,
    started: float,
) -> socket.socket:
    try:
        if socks is None:
            sock = open_connection(
                host, port, bind=bind, device=device, timeout=timeout, mptcp=mptcp
            )
        else:
            sock = open_connection(
                socks[0], socks[1], bind=bind, device=device, timeout=timeout, mptcp=mptcp
            )
            try:
                socks5_connect(sock, host, port)
            except BaseException:
                sock.close()
                raise
    except TransferError as exc:
        exc.result = result
        result.error = str(exc)
        raise
    except OSError as exc:
        result.error = f"connect: {exc}"
        raise TransferError(result.error, result) from exc
    result.connect_time = round(time.monotonic() - started, 6)
    result.local = sock.getsockname()[0]
    return sock


def download(
    url_host: str,
    port: int = 80,
    n: int = 1 << 20,
    seed: str = "0",
    *,
    socks: tuple[str, int] | None = None,
    bind: str | None = None,
    device: str | None = None,
    progress: Progress | None = None,
    tick: float = 0.1,
    timeout: float = 10.0,
    mptcp: bool = False,
    verify: bool = True,
) -> TransferResult:
    """``GET /bytes/<n>?seed=<seed>`` from ``url_host``:``port``, directly or through ``socks``.

    ``timeout`` bounds the connection set-up and any stretch without progress. Raises
    :class:`TransferError` (with the partial result attached) when the transfer fails. With
    ``verify`` the expected digest is computed afterwards, outside the timed part.
    """
    result = TransferResult("download", url_host, port, n)
    started = time.monotonic()
    sock = _connect(result, url_host, port, socks, bind, device, timeout, mptcp, started)
    meter = _Meter(result, started, tick, timeout, progress)
    digest = hashlib.sha256()
    try:
        with sock:
            request = (
                f"GET /bytes/{n}?seed={seed} HTTP/1.1\r\n"
                f"Host: {_host_header(url_host, port)}\r\n"
                "Connection: close\r\n\r\n"
            )
            sock.sendall(request.encode())
            sock.settimeout(tick)
            status, headers, body = _read_head(sock, meter)
            if status != 200:
                raise TransferError(f"HTTP status {status}", result)
            length = int(headers.get("content-length", n))
            digest.update(body)
            meter.update(len(body))
            buffer = bytearray(CHUNK)
            view = memoryview(buffer)
            while result.bytes < length:
                try:
                    got = sock.recv_into(view, min(CHUNK, length - result.bytes))
                except TimeoutError:
                    meter.update(0)
                    continue
                if not got:
                    raise TransferError("connection closed early", result)
                digest.update(view[:got])
                meter.update(got)
    except TransferError as exc:
        result.error = str(exc)
        raise
    except OSError as exc:
        result.error = f"transfer: {exc}"
        raise TransferError(result.error, result) from exc
    finally:
        result.elapsed = round(time.monotonic() - started, 6)
        result.sha256 = digest.hexdigest()
    meter.emit(time.monotonic())
    if verify:
        result.expected_sha256 = expected_sha256(n, seed)
    return result


def upload(
    url_host: str,
    port: int = 80,
    n: int = 1 << 20,
    seed: str = "0",
    *,
    socks: tuple[str, int] | None = None,
    bind: str | None = None,
    device: str | None = None,
    progress: Progress | None = None,
    tick: float = 0.1,
    timeout: float = 10.0,
    mptcp: bool = False,
) -> TransferResult:
    """``POST /upload`` n bytes of the stream for ``seed``; the server's digest must match ours.

    Progress counts bytes handed to the kernel, which runs ahead of the wire by the socket's send
    buffer; ``elapsed`` ends when the server's answer (sent after it read everything) arrives.
    """
    result = TransferResult("upload", url_host, port, n)
    started = time.monotonic()
    sock = _connect(result, url_host, port, socks, bind, device, timeout, mptcp, started)
    meter = _Meter(result, started, tick, timeout, progress)
    digest = hashlib.sha256()
    try:
        with sock:
            head = (
                f"POST /upload HTTP/1.1\r\nHost: {_host_header(url_host, port)}\r\n"
                "Content-Type: application/octet-stream\r\n"
                f"Content-Length: {n}\r\nConnection: close\r\n\r\n"
            )
            sock.sendall(head.encode())
            sock.settimeout(tick)
            for block in chunks(n, seed):
                digest.update(block)
                view = memoryview(block)
                while view:
                    try:
                        sent = sock.send(view)
                    except TimeoutError:
                        meter.update(0)
                        continue
                    view = view[sent:]
                    meter.update(sent)
            result.sha256 = digest.hexdigest()
            result.expected_sha256 = result.sha256
            status, headers, body = _read_head(sock, meter)
            length = int(headers.get("content-length", 0))
            while len(body) < length:
                try:
                    got = sock.recv(length - len(body))
                except TimeoutError:
                    meter.update(0)
                    continue
                if not got:
                    break
                body += got
            if status != 200:
                raise TransferError(f"HTTP status {status}", result)
            result.remote_reported = json.loads(body)
    except TransferError as exc:
        result.error = str(exc)
        raise
    except (OSError, ValueError) as exc:
        result.error = f"transfer: {exc}"
        raise TransferError(result.error, result) from exc
    finally:
        result.elapsed = round(time.monotonic() - started, 6)
    meter.emit(time.monotonic())
    reported = result.remote_reported or {}
    if reported.get("bytes") != n or reported.get("sha256") != result.sha256:
        result.error = f"server saw {reported.get('bytes')} bytes, digest {reported.get('sha256')}"
    return result


@dataclass
class FetchManyResult:
    """What :func:`fetch_many` measured. Times are seconds since it started (before connecting)."""

    host: str
    port: int
    connections: int
    objects: int
    requested: int  # bytes of all objects
    bytes: int = 0
    fetched: int = 0  # objects received whole with the right digest
    elapsed: float = 0.0  # until the last object's last byte
    connect_times: list[float] = field(default_factory=list)
    per_connection: list[int] = field(default_factory=list)  # objects fetched by each
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and self.fetched == self.objects and self.bytes == self.requested

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        data["mbit_per_s"] = round(self.bytes * 8 / self.elapsed / 1e6, 3) if self.elapsed else 0
        return data


def _http_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one response head from a keep-alive connection: status, lower-cased headers and the
    body bytes that came with it (a request is sent only after the previous body was read, so
    nothing of a later response can be among them)."""
    data = b""
    while b"\r\n\r\n" not in data:
        got = sock.recv(65536)
        if not got:
            raise TransferError("connection closed before the response")
        data += got
        if len(data) > 65536 + CHUNK:
            raise TransferError("response head too long")
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("iso-8859-1").split("\r\n")
    match = re.match(r"HTTP/1\.[01] (\d{3})", lines[0])
    if not match:
        raise TransferError(f"bad status line {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(match.group(1)), headers, body


def fetch_many(
    url_host: str,
    port: int = 80,
    sizes: list[int] | tuple[int, ...] = (8 << 10, 30 << 10, 120 << 10),
    objects: int = 60,
    connections: int = 6,
    seed: str = "many",
    *,
    socks: tuple[str, int] | None = None,
    bind: str | None = None,
    device: str | None = None,
    timeout: float = 10.0,
    mptcp: bool = False,
) -> FetchManyResult:
    """Fetch ``objects`` objects (object i: ``GET /bytes/<sizes[i % len(sizes)]>?seed=<seed>-<i>``)
    over ``connections`` persistent HTTP/1.1 connections opened at once, directly or through
    ``socks``; each connection takes the next object as soon as it has read the previous one.

    ``timeout`` bounds each connection set-up and any stretch without progress. A connection that
    fails records an error and stops; the others go on with the remaining objects. Digests are
    checked after the clock stopped.
    """
    wanted = [sizes[i % len(sizes)] for i in range(objects)]
    result = FetchManyResult(url_host, port, connections, objects, sum(wanted))
    result.connect_times = [0.0] * connections
    result.per_connection = [0] * connections
    lock = threading.Lock()
    pending = iter(range(objects))
    digests: dict[int, str] = {}
    finished = [0.0]
    started = time.monotonic()

    def next_object() -> int | None:
        with lock:
            return next(pending, None)

    def worker(k: int) -> None:
        try:
            if socks is None:
                sock = open_connection(
                    url_host, port, bind=bind, device=device, timeout=timeout, mptcp=mptcp
                )
            else:
                sock = open_connection(
                    socks[0], socks[1], bind=bind, device=device, timeout=timeout, mptcp=mptcp
                )
        except OSError as exc:
            with lock:
                result.errors.append(f"connection {k}: connect: {exc}")
            return
        with sock:
            try:
                if socks is not None:
                    socks5_connect(sock, url_host, port)
                result.connect_times[k] = round(time.monotonic() - started, 6)
                sock.settimeout(timeout)
                buffer = bytearray(CHUNK)
                view = memoryview(buffer)
                while (i := next_object()) is not None:
                    n = wanted[i]
                    sock.sendall(
                        f"GET /bytes/{n}?seed={seed}-{i} HTTP/1.1\r\n"
                        f"Host: {_host_header(url_host, port)}\r\n\r\n".encode()
                    )
                    status, headers, body = _http_response(sock)
                    if status != 200:
                        raise TransferError(f"object {i}: HTTP status {status}")
                    length = int(headers.get("content-length", n))
                    digest = hashlib.sha256(body)
                    got_total = len(body)
                    while got_total < length:
                        got = sock.recv_into(view, min(CHUNK, length - got_total))
                        if not got:
                            raise TransferError(f"object {i}: connection closed early")
                        digest.update(view[:got])
                        got_total += got
                    now = time.monotonic()
                    with lock:
                        digests[i] = digest.hexdigest()
                        result.bytes += got_total
                        result.per_connection[k] += 1
                        finished[0] = max(finished[0], now)
            except (OSError, TransferError) as exc:
                with lock:
                    result.errors.append(f"connection {k}: {exc or type(exc).__name__}")

    threads = [
        threading.Thread(target=worker, args=(k,), name=f"fetch-{k}", daemon=True)
        for k in range(connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.elapsed = round((finished[0] or time.monotonic()) - started, 6)
    for i, digest in digests.items():
        if digest == expected_sha256(wanted[i], f"{seed}-{i}"):
            result.fetched += 1
        else:
            result.errors.append(f"object {i}: wrong digest")
    if len(digests) < objects and not result.errors:
        result.errors.append(f"only {len(digests)} of {objects} objects fetched")
    return result


# --- UDP echo ----------------------------------------------------------------------------------


def echo(
    host: str,
    port: int = 7,
    *,
    count: int = 10,
    interval: float = 0.1,
    timeout: float = 1.0,
    size: int = 64,
    bind: str | None = None,
    device: str | None = None,
    socks: tuple[str, int] | None = None,
) -> EchoResult:
    """Send ``count`` datagrams ``interval`` apart to a UDP echo service and time the answers.

    Waits at most ``timeout`` after the last datagram. Answers are matched by a random token and a
    sequence number, so late answers of an earlier run are ignored and duplicates count once.
    With ``socks``, the datagrams go through that SOCKS5 proxy's UDP ASSOCIATE (RFC 1928).
    """
    result = EchoResult(host, port)
    family = socket.AF_UNSPEC
    if bind is not None:
        family = socket.AF_INET6 if _is_v6_literal(bind) else socket.AF_INET
    control = None
    prefix = b""
    if socks is not None:
        control, relay = _socks5_associate(socks)
        ip = ipaddress.ip_address(host)
        prefix = b"\x00\x00\x00" + (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
        prefix += struct.pack("!H", port)
        af = socket.AF_INET6 if ":" in relay[0] else socket.AF_INET
        kind, proto, address = socket.SOCK_DGRAM, 0, relay
    else:
        af, kind, proto, _name, address = socket.getaddrinfo(host, port, family, socket.SOCK_DGRAM)[
            0
        ]
    token = os.urandom(8)
    header = struct.Struct("!8sI")
    padding = bytes(max(0, size - header.size))
    sent_at: dict[int, float] = {}
    with contextlib.ExitStack() as stack, socket.socket(af, kind, proto) as sock:
        if control is not None:
            stack.enter_context(control)
        if device:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        if bind is not None:
            sock.bind((bind, 0))
        sock.setblocking(False)
        start = time.monotonic()
        seq = 0
        deadline = start + max(count - 1, 0) * interval + timeout
        while True:
            now = time.monotonic()
            if seq < count and now >= start + seq * interval:
                sent_at[seq] = now
                with contextlib.suppress(OSError):  # unreachable now: counts as lost
                    sock.sendto(prefix + header.pack(token, seq) + padding, address)
                seq += 1
                result.sent = seq
                continue
            if now >= deadline or (seq == count and len(result.rtts_ms) == count):
                break
            wake = start + seq * interval if seq < count else deadline
            readable, _, _ = select.select([sock], [], [], max(0.0, min(wake, deadline) - now))
            if not readable:
                continue
            with contextlib.suppress(OSError):
                data = sock.recv(65535)[len(prefix) :]
                arrived = time.monotonic()
                if len(data) >= header.size:
                    got_token, got_seq = header.unpack_from(data)
                    if got_token == token and got_seq in sent_at:
                        result.rtts_ms.append(round((arrived - sent_at.pop(got_seq)) * 1e3, 3))
    return result


# --- command line ------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``1000``, ``64k``, ``10M``, ``1G`` (binary multiples) -> bytes."""
    match = re.fullmatch(r"(\d+)([kKmMgG]?)i?[bB]?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text}")
    shift = {"": 0, "k": 10, "m": 20, "g": 30}[match.group(2).lower()]
    return int(match.group(1)) << shift


def parse_endpoint(text: str) -> tuple[str, int]:
    """``127.0.0.1:1080`` or ``[::1]:1080`` -> (host, port)."""
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text}")
    host = match.group(1) or match.group(3)
    return host, int(match.group(2) or match.group(4))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m braid.netbed.traffic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("download", "upload"):
        sub = commands.add_parser(name)
        sub.add_argument("host")
        sub.add_argument("--port", type=int, default=80)
        sub.add_argument("--bytes", type=parse_size, default=1 << 20, dest="n")
        sub.add_argument("--seed", default="0")
        sub.add_argument("--socks", type=parse_endpoint, help="SOCKS5 proxy HOST:PORT")
        sub.add_argument("--bind", help="local source address")
        sub.add_argument("--device", help="leave through this interface (SO_BINDTODEVICE)")
        sub.add_argument("--mptcp", action="store_true", help="use an MPTCP socket")
        sub.add_argument(
            "--timeout", type=float, default=10.0, help="connect timeout and longest stall (s)"
        )
        sub.add_argument("--tick", type=float, default=0.1, help="progress interval (s)")
        sub.add_argument(
            "--progress", action="store_true", help='print {"t": wall-clock, "bytes": n} per tick'
        )
    sub = commands.add_parser("fetch-many", help="many objects over a few keep-alive connections")
    sub.add_argument("host")
    sub.add_argument("--port", type=int, default=80)
    sub.add_argument("--connections", type=int, default=6)
    sub.add_argument("--objects", type=int, default=60)
    sub.add_argument(
        "--sizes",
        type=lambda text: [parse_size(part) for part in text.split(",")],
        default=[8 << 10, 30 << 10, 120 << 10],
        help="object sizes, cycled through (default 8k,30k,120k)",
    )
    sub.add_argument("--seed", default="many")
    sub.add_argument("--socks", type=parse_endpoint, help="SOCKS5 proxy HOST:PORT")
    sub.add_argument("--bind", help="local source address")
    sub.add_argument("--device", help="leave through this interface (SO_BINDTODEVICE)")
    sub.add_argument("--mptcp", action="store_true", help="use MPTCP sockets")
    sub.add_argument("--timeout", type=float, default=10.0, help="connect timeout, longest stall")
    sub = commands.add_parser("echo")
    sub.add_argument("host")
    sub.add_argument("--port", type=int, default=7)
    sub.add_argument("--count", type=int, default=10)
    sub.add_argument("--interval", type=float, default=0.1)
    sub.add_argument("--timeout", type=float, default=1.0)
    sub.add_argument("--size", type=int, default=64)
    sub.add_argument("--bind")
    sub.add_argument("--device")
    sub.add_argument("--socks", type=parse_endpoint, help="SOCKS5 proxy HOST:PORT (UDP ASSOCIATE)")
    return parser


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "echo":
        outcome = echo(
            args.host,
            args.port,
            count=args.count,
            interval=args.interval,
            timeout=args.timeout,
            size=args.size,
            bind=args.bind,
            device=args.device,
            socks=args.socks,
        )
        _emit(outcome.to_dict())
        return 0 if outcome.received else 1

    if args.command == "fetch-many":
        many = fetch_many(
            args.host,
            args.port,
            args.sizes,
            args.objects,
            args.connections,
            args.seed,
            socks=args.socks,
            bind=args.bind,
            device=args.device,
            timeout=args.timeout,
            mptcp=args.mptcp,
        )
        _emit(many.to_dict())
        return 0 if many.ok else 1

    def tick(nbytes: int, wall: float) -> None:
        _emit({"t": round(wall, 6), "bytes": nbytes})

    function = download if args.command == "download" else upload
    try:
        result = function(
            args.host,
            args.port,
            args.n,
            args.seed,
            socks=args.socks,
            bind=args.bind,
            device=args.device,
            timeout=args.timeout,
            tick=args.tick,
            mptcp=args.mptcp,
            progress=tick if args.progress else None,
        )
    except TransferError as exc:
        result = exc.result or TransferResult(
            args.command, args.host, args.port, args.n, error=str(exc)
        )
    _emit(result.to_dict())
    return 0 if result.ok else 1


def iter_json_lines(text: str) -> Iterator[dict[str, Any]]:
    """Parse the CLI's output (progress lines, then the result) back into objects."""
    for line in text.splitlines():
        if line.strip():
            yield json.loads(line)


if __name__ == "__main__":
    sys.exit(main())
