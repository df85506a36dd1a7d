"""The traffic clients and target services on loopback: no namespaces, no root needed."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator

import pytest

from braid.netbed import traffic
from braid.netbed.payload import CHUNK, chunks, expected_sha256
from braid.netbed.target import (
    SCRIPT_CODE,
    SCRIPT_MIN,
    AccessLog,
    TargetServer,
    UdpEcho,
    script_body,
)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _ipv6_loopback(), reason="needs IPv6 on loopback")


@pytest.fixture(scope="module")
def target() -> Iterator[tuple[int, int]]:
    """(http port, echo port) of a target server on loopback."""
    server = TargetServer("::", 0, AccessLog(None))
    echo = UdpEcho("::", 0)
    echo.start()
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
    )
    thread.start()
    yield server.server_address[1], echo.sock.getsockname()[1]
    server.shutdown()
    server.server_close()
    echo.close()


class MiniSocks5:
    """Just enough of a SOCKS5 server to check the client against: records each request."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests: list[tuple[int, str, int]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    @staticmethod
    def _exact(sock: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError
            data += chunk
        return data

    def _serve(self, client: socket.socket) -> None:
        with client:
            _version, nmethods = self._exact(client, 2)
            self._exact(client, nmethods)
            client.sendall(b"\x05\x00")
            _version, _cmd, _rsv, atyp = self._exact(client, 4)
            if atyp == 1:
                host = socket.inet_ntop(socket.AF_INET, self._exact(client, 4))
            elif atyp == 4:
                host = socket.inet_ntop(socket.AF_INET6, self._exact(client, 16))
            else:
                host = self._exact(client, self._exact(client, 1)[0]).decode()
            port = int.from_bytes(self._exact(client, 2), "big")
            self.requests.append((atyp, host, port))
            if host == "refuse.test":
                client.sendall(b"\x05\x05\x00\x01" + bytes(6))
                return
            upstream = socket.create_connection((host, port))
            client.sendall(b"\x05\x00\x00\x01" + bytes(6))
            with upstream:
                pump = threading.Thread(target=self._pump, args=(upstream, client), daemon=True)
                pump.start()
                self._pump(client, upstream)
                pump.join(5)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()


def test_payload_is_deterministic_and_chunking_independent() -> None:
    n = 3 * CHUNK + 12345
    whole = b"".join(chunks(n, "a"))
    assert len(whole) == n
    assert b"".join(chunks(n, "a", chunk=4096)) == whole
    assert whole[:1000] == b"".join(chunks(1000, "a"))
    assert b"".join(chunks(n, "b")) != whole
    assert expected_sha256(0) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest.mark.parametrize("n", [0, 1, CHUNK + 7])
def test_direct_download(target: tuple[int, int], host: str, n: int) -> None:
    result = traffic.download(host, target[0], n, "s1")
    assert result.ok, result
    assert result.sha256 == expected_sha256(n, "s1")
    assert result.ttfb is not None and result.ttfb <= result.elapsed
    assert result.ticks[-1][1] == n


def test_upload(target: tuple[int, int]) -> None:
    ticks: list[tuple[int, float]] = []
    result = traffic.upload(
        "::1", target[0], 5 * CHUNK + 3, "up", progress=lambda n, t: ticks.append((n, t))
    )
    assert result.ok, result
    assert result.remote_reported == {"bytes": 5 * CHUNK + 3, "sha256": result.sha256}
    assert ticks and ticks[-1][0] == 5 * CHUNK + 3


@pytest.mark.parametrize(("host", "atyp"), [("127.0.0.1", 1), ("::1", 4), ("localhost", 3)])
def test_download_through_socks5(target: tuple[int, int], host: str, atyp: int) -> None:
    proxy = MiniSocks5()
    try:
        result = traffic.download(host, target[0], 100_000, "p", socks=("127.0.0.1", proxy.port))
        assert result.ok, result
        assert proxy.requests == [(atyp, host, target[0])]
    finally:
        proxy.close()


def test_socks5_refusal_is_reported(target: tuple[int, int]) -> None:
    proxy = MiniSocks5()
    try:
        with pytest.raises(traffic.SocksError, match="connection refused"):
            traffic.download("refuse.test", 80, 10, socks=("127.0.0.1", proxy.port))
    finally:
        proxy.close()


def test_http_errors_and_stalls(target: tuple[int, int]) -> None:
    with pytest.raises(traffic.TransferError, match="connect"):
        traffic.download("127.0.0.1", 1, 10, timeout=1)
    # A listener that never answers: the idle timeout ends the wait, ticks keep coming.
    with (
        socket.create_server(("127.0.0.1", 0)) as silent,
        pytest.raises(traffic.TransferError, match="no progress") as caught,
    ):
        traffic.download("127.0.0.1", silent.getsockname()[1], 10, timeout=0.5, tick=0.1)
    assert caught.value.result is not None
    assert len(caught.value.result.ticks) >= 3


def test_echo(target: tuple[int, int]) -> None:
    result = traffic.echo("::1", target[1], count=5, interval=0.01)
    assert result.sent == 5 and result.received == 5 and result.loss == 0
    nobody = traffic.echo("127.0.0.1", 9, count=2, interval=0.01, timeout=0.2)
    assert nobody.sent == 2 and nobody.received == 0


def test_cli_sizes_and_endpoints() -> None:
    assert traffic.parse_size("10M") == 10 << 20
    assert traffic.parse_size("64k") == 65536
    assert traffic.parse_size("123") == 123
    assert traffic.parse_endpoint("[::1]:1080") == ("::1", 1080)
    assert traffic.parse_endpoint("127.0.0.1:1080") == ("127.0.0.1", 1080)


@pytest.mark.parametrize("through_socks", [False, True])
def test_fetch_many_over_keep_alive_connections(
    target: tuple[int, int], through_socks: bool
) -> None:
    proxy = MiniSocks5() if through_socks else None
    try:
        result = traffic.fetch_many(
            "127.0.0.1",
            target[0],
            sizes=[1000, CHUNK + 3],
            objects=9,
            connections=3,
            socks=("127.0.0.1", proxy.port) if proxy else None,
        )
        assert result.ok, result
        assert result.fetched == 9 and result.bytes == 5 * 1000 + 4 * (CHUNK + 3)
        assert sum(result.per_connection) == 9
        assert 0 < max(result.connect_times) <= result.elapsed
        if proxy:  # one CONNECT per connection, not per object: they are kept alive
            assert len(proxy.requests) == 3
    finally:
        if proxy:
            proxy.close()


def test_fetch_many_reports_failures(target: tuple[int, int]) -> None:
    result = traffic.fetch_many("127.0.0.1", 1, sizes=[10], objects=4, connections=2, timeout=1)
    assert not result.ok and result.fetched == 0
    assert len(result.errors) == 2 and all("connect" in e for e in result.errors)
    cli = traffic.main(
        ["fetch-many", "127.0.0.1", "--port", str(target[0]), "--objects", "4", "--sizes", "1k,2k"]
    )
    assert cli == 0


def test_page_and_scripts(target: tuple[int, int]) -> None:
    port = target[0]

    def get(path: str) -> tuple[int, dict[str, str], bytes]:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        return int(lines[0].split()[1]), headers, body

    status, headers, page = get("/page/3?size=5000&v=run%201")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert headers["cache-control"] == "no-store"
    scripts = re.findall(rb'<script src="([^"]+)"></script>', page)
    assert scripts == [f"/script/{i}.js?size=5000&v=run%201".encode() for i in range(3)]
    status, headers, script = get(scripts[0].decode())
    assert status == 200 and headers["content-type"] == "text/javascript"
    assert len(script) == 5000 == int(headers["content-length"])
    assert script.startswith(SCRIPT_CODE) and script.endswith(b"*/\n")
    assert script.count(b"*/") == 1  # one comment, closed only at the end
    assert script_body(1) == SCRIPT_CODE + b"/**/\n" and len(script_body(SCRIPT_MIN)) == SCRIPT_MIN
    assert get("/script/1.js?size=big")[0] == 400
    assert get("/page/x")[0] == 404
    assert b"<script" not in get("/page/0")[2]
