"""The world's DNS server and client, UDP responders, router page and capture parser on loopback:
no namespaces, no root needed."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from braid.netbed import dns
from braid.netbed.capture import parse_line
from braid.netbed.lan import PageServer
from braid.netbed.target import AccessLog, UdpResponder, serve_in_thread


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[dns.DnsServer, list[dict[str, Any]]]]:
    entries: list[dict[str, Any]] = []
    srv = dns.DnsServer(["127.0.0.1"], 0, dns.braid_zone(), lambda **e: entries.append(e))
    srv.start()
    yield srv, entries
    srv.close()


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_answers(server: tuple[dns.DnsServer, list[dict[str, Any]]], transport: str) -> None:
    srv, entries = server

    def ask(name: str, qtype: str) -> dns.Message:
        return dns.query("127.0.0.1", name, qtype, port=srv.port, transport=transport)

    a = ask("FILES.braid.test.", "A")
    assert (a.rcode, a.addresses, a.authoritative) == ("NOERROR", ["198.19.0.1"], True)
    assert a.questions == [dns.Question("FILES.braid.test", 1)]  # the question comes back as sent
    assert ask("files.braid.test", "AAAA").addresses == ["2001:db8:ff::1"]
    assert sorted(ask("files.braid.test", "ANY").addresses) == ["198.19.0.1", "2001:db8:ff::1"]
    nodata = ask("v6only.braid.test", "A")
    assert (nodata.rcode, nodata.answers) == ("NOERROR", [])
    assert [r.rtype for r in nodata.authority] == [dns.TYPES["SOA"]]
    assert ask("v6only.braid.test", "HTTPS").answers == []
    assert ask("x.files.braid.test", "A").rcode == "NXDOMAIN"
    assert [r.rtype for r in ask("braid.test", "SOA").answers] == [dns.TYPES["SOA"]]
    out = ask("example.com", "A")
    assert (out.rcode, out.authoritative) == ("REFUSED", False)
    last = entries[-1]
    assert last["transport"] == transport and last["client"] == "127.0.0.1"
    assert (last["qname"], last["qtype"], last["rcode"]) == ("example.com", "A", "REFUSED")


def test_odd_queries() -> None:
    zone = dns.braid_zone()
    good = dns.build_query("files.braid.test", "A", ident=7)
    assert dns.answer(zone, good[:5])[0] is None
    response = dns.answer(zone, good)[0]
    assert response is not None
    assert dns.answer(zone, response)[0] is None  # responses are never answered
    notimp = dns.answer(zone, good[:2] + struct.pack("!H", 0x2800) + good[4:])[0]
    assert notimp is not None and dns.parse_message(notimp).rcode == "NOTIMP"
    formerr = dns.answer(zone, good[:-3])[0]
    assert formerr is not None and dns.parse_message(formerr).rcode == "FORMERR"
    # A question whose name is a compression pointer to itself: a loop, not a hang.
    looped = good[:12] + b"\xc0\x0c" + b"\x00\x01\x00\x01"
    assert dns.parse_message(dns.answer(zone, looped)[0] or b"").rcode == "FORMERR"
    with pytest.raises(dns.DnsError):
        dns.encode_name("a" * 64 + ".test")


def test_client_times_out_and_is_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        with pytest.raises(TimeoutError):
            dns.query("127.0.0.1", "a.test", port=silent.getsockname()[1], timeout=0.2)
        port = silent.getsockname()[1]
    # Now closed: ICMP port unreachable.
    with pytest.raises(ConnectionRefusedError):
        dns.query("127.0.0.1", "a.test", port=port, timeout=1)


def test_udp_responder_answers_from_the_address_asked(tmp_path: Any) -> None:
    path = tmp_path / "udp.log"
    log = AccessLog(path.open("a", encoding="utf-8"))
    responder = UdpResponder("::", 0, b"quic", "quic", log)
    responder.start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(2)
            # Connected to 127.0.0.2: a reply from 127.0.0.1 (the default source) would be dropped.
            sock.connect(("127.0.0.2", responder.port))
            sock.send(b"abc")
            assert sock.recv(100) == b"quic"
            client_port = sock.getsockname()[1]
    finally:
        responder.close()
        log.close()
    assert f'"client":"127.0.0.1","port":{client_port},"service":"quic"' in path.read_text()


def test_router_page() -> None:
    page = PageServer("127.0.0.1", 0, "router 9", AccessLog(None))
    serve_in_thread(page, poll_interval=0.05)
    try:
        with socket.create_connection(page.server_address[:2], timeout=2) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"\r\n\r\nrouter 9\n")
    finally:
        page.shutdown()
        page.server_close()


def test_parse_tcpdump_lines() -> None:
    v4 = parse_line("1.5 IP 198.18.1.2.4321 > 198.19.0.53.53: 7+ A? files.braid.test. (34)", "e")
    assert v4 is not None
    assert [v4[k] for k in ("time", "iface", "direction", "kind", "src", "sport", "dst")] == [
        1.5,
        "e",
        "",
        "IP",
        "198.18.1.2",
        4321,
        "198.19.0.53",
    ]
    assert (v4["dport"], v4["info"]) == (53, "7+ A? files.braid.test. (34)")
    v6 = parse_line("2.0 wlan0 In  IP6 2001:db8:1::2.80 > 2001:db8:ff::1.5555: Flags [S], len 0")
    assert v6 is not None
    assert [v6[k] for k in ("iface", "direction", "src", "sport", "dst", "dport")] == [
        "wlan0",
        "In",
        "2001:db8:1::2",
        80,
        "2001:db8:ff::1",
        5555,
    ]
    icmp = parse_line("3.0 IP 198.18.1.1 > 198.18.1.2: ICMP 198.18.1.53 udp port 53 unreachable")
    assert icmp is not None and (icmp["src"], icmp["sport"], icmp["dport"]) == (
        "198.18.1.1",
        None,
        None,
    )
    arp = parse_line("4.0 eth0 Out ARP, Request who-has 198.18.1.53 tell 198.18.1.2, length 28")
    assert arp is not None and (arp["kind"], arp["iface"]) == ("ARP,", "eth0")
    assert parse_line("reading from file x.pcap") is None


def test_cli(server: tuple[dns.DnsServer, list[dict[str, Any]]], capsys: Any) -> None:
    port = str(server[0].port)
    assert dns.main(["--tcp", "--port", port, "127.0.0.1", "files.braid.test"]) == 0
    assert json.loads(capsys.readouterr().out)["addresses"] == ["198.19.0.1"]
    assert dns.main(["--port", port, "127.0.0.1", "none.braid.test", "AAAA"]) == 1
    assert json.loads(capsys.readouterr().out)["rcode"] == "NXDOMAIN"
