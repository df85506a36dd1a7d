"""What the world offers the system-wide mode tests: DNS, resolvers, 443, logs, router pages,
packet capture."""

from __future__ import annotations

import shutil
import socket
import time

import pytest

from braid.netbed import NetbedError, World, python_argv, traffic, unavailable_reason
from braid.netbed.dns import query

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason())),
]

needs_tcpdump = pytest.mark.skipif(shutil.which("tcpdump") is None, reason="needs tcpdump")


def _http_get(host: str, port: int, path: str = "/", device: str | None = None) -> str:
    """Status line and body of a GET, through ``device``."""
    with traffic.open_connection(host, port, device=device, timeout=3) as sock:
        shown = f"[{host}]" if ":" in host else host
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {shown}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        for _ in range(100):  # bounded: the answers are tiny
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    return head.splitlines()[0] + "\n" + body


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_dns_answers_from_the_laptop_through_a_link(world: World, transport: str) -> None:
    since = time.time()
    with world.enter("laptop"):

        def ask(name: str, qtype: str, server: str = world.dns_v4) -> tuple[str, list[str]]:
            reply = query(server, name, qtype, transport=transport, device="eth0")
            assert reply.authoritative
            return reply.rcode, reply.addresses

        assert ask(world.target_name, "A") == ("NOERROR", [world.target_v4])
        assert ask(world.target_name, "AAAA", world.dns_v6) == ("NOERROR", [world.target_v6])
        assert ask(world.v6only_name, "AAAA") == ("NOERROR", [world.target_v6])
        assert ask(world.v6only_name, "A") == ("NOERROR", [])
        assert ask("nothing.braid.test", "A") == ("NXDOMAIN", [])
    seen = [
        (e["client"], e["server"], e["qname"], e["qtype"], e["rcode"])
        for e in world.dns_log()
        if e["time"] >= since and e["transport"] == transport
    ]
    me = world.laptop_addr("eth0")
    assert seen == [
        (me, world.dns_v4, world.target_name, "A", "NOERROR"),
        (world.laptop_addr("eth0", 6), world.dns_v6, world.target_name, "AAAA", "NOERROR"),
        (me, world.dns_v4, world.v6only_name, "AAAA", "NOERROR"),
        (me, world.dns_v4, world.v6only_name, "A", "NOERROR"),
        (me, world.dns_v4, "nothing.braid.test", "A", "NXDOMAIN"),
    ]


def test_the_laptops_resolver_does_not_answer(world: World) -> None:
    hits = world.dead_resolver_hits()
    with world.enter("laptop"):
        for transport in ("udp", "tcp"):
            with pytest.raises(OSError):
                query(world.laptop_resolver, world.target_name, transport=transport, timeout=1)
    assert world.dead_resolver_hits() >= hits + 2
    # Neither the hosts file nor the configured resolver knows the name; localhost still works.
    started = time.monotonic()
    done = world.run("laptop", ["getent", "hosts", world.target_name], check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert time.monotonic() - started < 5
    assert world.run("laptop", ["getent", "hosts", "localhost"]).stdout.strip()


def test_the_server_resolves_through_the_dns_server(world: World) -> None:
    since = time.time()
    out = world.run("server", ["getent", "ahosts", world.v6only_name]).stdout
    assert world.target_v6 in out and world.target_v4 not in out
    clients = {e["client"] for e in world.dns_log() if e["time"] >= since}
    assert clients & {world.server_v4, world.server_v6}


def test_tcp_and_udp_443(world: World) -> None:
    since = time.time()
    with world.enter("laptop"):
        result = traffic.download(
            world.target_v4, world.https_port, 10_000, "tls", device="eth0", timeout=5
        )
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"wlan0")
            sock.settimeout(2)
            sock.connect((world.target_v6, world.quic_port))  # connected: checks the reply source
            sock.send(b"\xc0hello")
            assert sock.recv(100) == b"quic"
    assert result.ok, result
    entry = world.wait_access(lambda e: e["path"] == "/bytes/10000?seed=tls")
    assert entry["server_port"] == 443 and entry["client"] == world.laptop_addr("eth0")
    quic = [e for e in world.udp_log("quic") if e["time"] >= since]
    assert [(e["client"], e["bytes"]) for e in quic] == [(world.laptop_addr("wlan0", 6), 6)]


def test_udp_echo_is_logged(world: World) -> None:
    since = time.time()
    with world.enter("laptop"):
        result = traffic.echo(
            world.target_v4, world.echo_port, count=2, interval=0.01, size=321, device="wlan0"
        )
    assert result.received == 2
    entries = [e for e in world.udp_log("echo") if e["time"] >= since and e["bytes"] == 321]
    assert [e["client"] for e in entries] == [world.laptop_addr("wlan0")] * 2
    assert all(e["server_port"] == world.echo_port and e["port"] > 0 for e in entries)


def test_router_pages_answer_on_each_lan(world: World) -> None:
    since = time.time()
    with world.enter("laptop"):
        for link in world.links:
            for family in (4, 6):
                page = _http_get(world.gateway(link.name, family), world.router_port)
                assert page == f"HTTP/1.1 200 OK\n{world.router_text(link.name)}\n"
        assert "404" in _http_get(world.gateway("eth0"), world.router_port, "/admin")
    entries = [e for e in world.lan_log() if e["time"] >= since]
    assert [(e["link"], e["client"]) for e in entries[:-1]] == [
        (link.name, world.laptop_addr(link.name, family))
        for link in world.links
        for family in (4, 6)
    ]
    assert entries[-1]["path"] == "/admin" and entries[-1]["status"] == 404


@needs_tcpdump
def test_capture_sees_dns_only_when_sent(world: World) -> None:
    with world.capture("laptop", "eth0", "udp port 53") as quiet, world.enter("laptop"):
        traffic.echo(world.target_v4, world.echo_port, count=1, device="eth0")
    with world.capture("laptop", "eth0", "udp port 53") as cap, world.enter("laptop"):
        query(world.dns_v4, world.target_name, device="eth0")
    assert quiet.count() == 0
    packets = cap.packets()
    first = packets[0]
    assert (first["iface"], first["src"], first["dst"], first["dport"]) == (
        "eth0",
        world.laptop_addr("eth0"),
        world.dns_v4,
        53,
    )
    assert "A? files.braid.test." in first["info"]
    assert any(p["sport"] == 53 for p in packets)
    assert cap.path.is_file() and not cap.running


@needs_tcpdump
def test_capture_on_any_names_the_interface(world: World) -> None:
    with world.capture("laptop", "any", "udp port 53") as cap:
        done = world.run(
            "laptop",
            python_argv("braid.netbed.dns", "--device", "wlan0", world.dns_v6, world.v6only_name),
            check=False,
        )
    assert done.returncode == 0 and '"addresses": []' in done.stdout, done
    assert {(p["iface"], p["direction"]) for p in cap.packets()} == {
        ("wlan0", "Out"),
        ("wlan0", "In"),
    }


@needs_tcpdump
def test_capture_rejects_a_bad_filter(world: World) -> None:
    with pytest.raises(NetbedError, match="tcpdump"), world.capture("laptop", "eth0", "port x"):
        pass
