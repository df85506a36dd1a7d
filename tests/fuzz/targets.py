"""Fuzz targets: every parser Braid runs on bytes it did not write itself.

Each target takes the fuzzer's bytes, hands them to the product's own entry
point and lets through only the rejection that parser documents (ProtocolError,
SocksError, ControlError, PairingError, StateError, or nothing at all for the
loaders that report problems instead of raising). Any other exception, and any
broken invariant (an ``AssertionError`` here), is a finding.

Where a parser is fed a stream, or needs more than one input, the first bytes of
the input say how to cut the rest (a chunk size, an offset, a mode): the layout
is written by hand so that the seeds built from the real encoders (``seeds`` of
each target) are inputs in exactly that layout.

The JSON parsers get two kinds of input, chosen by the first byte (``json_input``):
raw bytes, where ``\x01 N C`` stands for N * 16 copies of C so that the fuzzer can
write arrays nested thousands deep in a few bytes; or a JSON document that
atheris.FuzzedDataProvider builds from the bytes, out of the keys and values the
parser knows and of values of every other type, so that type confusion (a list
where an object belongs, NaN, a 400-digit integer) is reached at once.

run.py imports this module inside ``atheris.instrument_imports()`` so that the
braid modules it pulls in are instrumented for coverage; atheris itself is only
imported when a target runs, so that pytest can list the targets without it.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import hmac
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from braid.daemon.links.store import FORMAT_VERSION as LINKS_FORMAT
from braid.daemon.links.store import LINKS_FILE, USAGE_FILE, Cap, LinkChoice, LinkStore
from braid.daemon.settings import BY_KEY, SETTINGS_FILE, Settings
from braid.daemon.settings import FORMAT_VERSION as SETTINGS_FORMAT
from braid.files import read_versioned_json
from braid.protocol import control, probe
from braid.protocol import datagram as dg
from braid.protocol.address import Address, AddressError, decode_address, encode_address
from braid.protocol.control import ControlError
from braid.protocol.pairing import Pairing, PairingError, normalise_fingerprint, parse_pairing
from braid.protocol.socks5 import SocksError, SocksServerConnection
from braid.protocol.tunnel import (
    AUTH_OK,
    EOF_FRAME,
    FRAME_MAX,
    TOKEN_MAX,
    Command,
    FrameDecoder,
    Hello,
    ProtocolError,
    Reply,
    encode_hello,
    encode_reply,
    encode_request,
    frame_header,
    parse_auth_reply,
    parse_hello,
    parse_reply,
    parse_request,
)
from braid.server.dns import (
    error_answer,
    is_answer_to,
    is_query,
    is_truncated,
    message_id,
    parse_resolv_conf,
    question,
)
from braid.server.policy import judge
from braid.server.state import CONFIG_NAME, Device, ServerConfig, StateDir, StateError, Timeouts


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    seeds: Callable[[], list[bytes]]
    max_len: int = 4096  # libFuzzer's -max_len: the longest input it tries
    dictionary: tuple[bytes, ...] = field(default=())  # tokens for libFuzzer's -dict


# --- helpers --------------------------------------------------------------------------

_scratch: Path | None = None


def scratch_dir() -> Path:
    """An empty directory for the file loaders, one per process.

    run.py names one in BRAID_FUZZ_SCRATCH and removes it after the child: libFuzzer
    ends the process without running Python's exit handlers.
    """
    global _scratch
    if _scratch is None:
        if given := os.environ.get("BRAID_FUZZ_SCRATCH"):
            _scratch = Path(given)
        else:
            _scratch = Path(tempfile.mkdtemp(prefix="braid-fuzz-"))
            atexit.register(shutil.rmtree, _scratch, True)
    for entry in os.scandir(_scratch):  # files moved aside by the previous input
        os.unlink(entry.path)
    return _scratch


def split(data: bytes) -> tuple[bytes, bytes]:
    """Two inputs from one: a u16 length of the first, the first, then the second."""
    if len(data) < 2:
        return b"", data
    n = int.from_bytes(data[:2], "big")
    return data[2 : 2 + n], data[2 + n :]


def join(first: bytes, second: bytes) -> bytes:
    return len(first).to_bytes(2, "big") + first + second


def chunks(data: bytes, step: int) -> list[bytes]:
    return [data[i : i + step] for i in range(0, len(data), step)] or [b""]


def read_size(byte: int) -> int:
    """How many bytes each read returns: 1 to 240, or 256 << (byte - 240) from byte 240 on."""
    return byte + 1 if byte < 0xF0 else 256 << (byte - 0xF0)


def text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


ADDRESSES = [
    Address("192.0.2.7", 443),
    Address("0.0.0.0", 0),
    Address("2001:db8::1", 8443),
    Address("::ffff:127.0.0.1", 80),
    Address("example.com", 80),
    Address("bücher.example", 443),
    Address("a" * 63 + "." + "b" * 63, 65535),
]


# --- JSON documents -------------------------------------------------------------------

REPEAT = 0x01  # in raw JSON input: REPEAT, N, C is N * 16 copies of C
JSON_TOKENS = (b'"', b"{", b"}", b"[", b"]", b":", b",", b"null", b"true", b"false", b"-1e999")
JSON_TOKENS += (b"NaN", b"Infinity", b"-Infinity", b"1e308", b"0.5", b"\\u0000", b"\\ud800")
JSON_TOKENS += (bytes([REPEAT, 0xFF]) + b"[", bytes([REPEAT, 0x40]) + b"{")
# Values of every JSON type that parsers tend to trip over.
ODD_VALUES = (None, True, False, 0, 1, -1, 2**63, 10**400, 0.5, -0.0, 1e308)
ODD_VALUES += (math.inf, -math.inf, math.nan, "", " ", "\x00", "\ud800", [], {}, [1], {"": 1})


def expand(data: bytes) -> bytes:
    """Raw JSON input with each REPEAT, N, C written out as N * 16 copies of C."""
    if REPEAT not in data:
        return data
    out = bytearray()
    i = 0
    while i < len(data):
        if data[i] == REPEAT and i + 2 < len(data):
            out += data[i + 2 : i + 3] * (16 * data[i + 1])
            i += 3
        else:
            out.append(data[i])
            i += 1
    return bytes(out)


def json_words(*groups: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(w for group in groups for w in group)


def generated_json(data: bytes, words: tuple[str, ...], values: tuple = ()) -> bytes:
    """A JSON document built from ``data`` by atheris.FuzzedDataProvider: an object at the top,
    its keys mostly from ``words``, its values from ``values``, ``words``, ODD_VALUES or random."""
    import atheris

    fdp = atheris.FuzzedDataProvider(data)
    keys = list(words)  # PickValueInList takes a list, not a tuple
    choices = [*values, *words, *ODD_VALUES]

    def key() -> str:
        return fdp.PickValueInList(keys) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeUnicode(8)

    def value(depth: int) -> object:
        kind = fdp.ConsumeIntInRange(0, 9 if depth < 5 else 5)
        if kind <= 2:
            return fdp.PickValueInList(choices)
        if kind == 3:
            return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 9))
        if kind == 4:
            return fdp.ConsumeFloat()
        if kind == 5:
            return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 40))
        if kind <= 7:
            return [value(depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))]
        return {key(): value(depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 6))}

    document = {key(): value(1) for _ in range(fdp.ConsumeIntInRange(0, 6))}
    return json.dumps(document).encode()


def json_input(data: bytes, words: tuple[str, ...], values: tuple = ()) -> bytes:
    """data[0] even: the rest as raw JSON text (REPEAT expanded); odd: generated_json of it."""
    if not data:
        return b""
    if data[0] % 2 == 0:
        return expand(data[1:])
    return generated_json(data[1:], words, values)


def raw_json(document: object) -> bytes:
    """A seed: the document as the raw-text kind of json_input."""
    return b"\x00" + json.dumps(document).encode()


def json_dictionary(words: tuple[str, ...]) -> tuple[bytes, ...]:
    return (*JSON_TOKENS, *(json.dumps(w).encode() for w in words))


# --- tunnel protocol --------------------------------------------------------------------


def tunnel_handshake(data: bytes) -> None:
    """HELLO as the server reads it, AUTH_OK as the client reads it."""
    try:
        parsed = parse_hello(data)
    except ProtocolError:
        pass
    else:
        if parsed is not None:
            hello, end = parsed
            assert isinstance(hello, Hello) and 0 < len(hello.token) <= TOKEN_MAX
            assert 0 < end <= len(data)
            assert parse_hello(data[:end]) == parsed
            assert parse_hello(data[: end - 1]) is None
    try:
        end = parse_auth_reply(data)
    except ProtocolError:
        return
    assert end is None or (end == len(AUTH_OK) and data.startswith(AUTH_OK))


def _tunnel_handshake_seeds() -> list[bytes]:
    return [encode_hello("t" * 43), encode_hello(b"\xff" * TOKEN_MAX) + b"rest", AUTH_OK]


def tunnel_messages(data: bytes) -> None:
    """REQUEST as the server reads it (then judged by its policy), REPLY as the client reads it."""
    for parse in (parse_request, parse_reply):
        try:
            parsed = parse(data)
        except ProtocolError:
            continue
        if parsed is None:
            continue
        message, end = parsed
        assert 0 < end <= len(data)
        assert 0 <= message.address.port <= 0xFFFF
        assert parse(data[:end]) == parsed
        assert parse(data[: end - 1]) is None
        reason = judge(message.address.host)
        assert reason is None or isinstance(reason, str)
        str(message.address)


def _tunnel_messages_seeds() -> list[bytes]:
    out = [encode_request(c, a) for c in Command for a in ADDRESSES]
    out += [encode_reply(r, a) for r in Reply for a in ADDRESSES[:3]]
    return out


def tunnel_frames(data: bytes) -> None:
    """The framed stream after the handshake, cut into reads of read_size(data[0]) bytes
    (at most 1024 reads, so that a big frame read byte by byte does not slow the fuzzer down)."""
    if not data:
        return
    decoder = FrameDecoder()
    stream = data[1:]
    payloads: list[bytes] = []
    try:
        for part in chunks(stream, max(read_size(data[0]), len(stream) // 1024)):
            payloads += decoder.feed(part)
            # Memory guard: at most one incomplete frame is ever held.
            assert decoder.pending <= 2 + FRAME_MAX - 1, decoder.pending
    except ProtocolError:
        assert decoder.eof
        return
    for payload in payloads:
        assert 0 < len(payload) <= FRAME_MAX
    consumed = sum(2 + len(p) for p in payloads) + (2 if decoder.eof else 0)
    assert consumed + decoder.pending == len(stream)
    assert (
        b"".join(frame_header(len(p)) + p for p in payloads) == stream[: consumed - 2 * decoder.eof]
    )


def _tunnel_frames_seeds() -> list[bytes]:
    frames = frame_header(5) + b"hello" + frame_header(3) + b"abc" + EOF_FRAME
    big = frame_header(FRAME_MAX) + bytes(FRAME_MAX)
    return [b"\xef" + frames, b"\x00" + frames, b"\xf4" + big + EOF_FRAME, b"\x02" + EOF_FRAME]


# --- addresses and SOCKS5 ---------------------------------------------------------------


def address(data: bytes) -> None:
    """decode_address at offset data[0] % 4 of the rest."""
    if not data:
        return
    buf, offset = data[1:], data[0] % 4
    try:
        decoded = decode_address(buf, offset)
    except AddressError as exc:
        assert exc.reply_code in (0x01, 0x08)
        return
    if decoded is None:
        return
    found, end = decoded
    assert offset < end <= len(buf)
    assert 0 <= found.port <= 0xFFFF
    assert decode_address(buf[:end], offset) == decoded
    str(found)
    found.is_name  # noqa: B018 - a property that parses the host
    with contextlib.suppress(AddressError):
        encode_address(found)


def _address_seeds() -> list[bytes]:
    return [bytes([i % 4]) + bytes(i % 4) + encode_address(a) for i, a in enumerate(ADDRESSES)]


def socks5(data: bytes) -> None:
    """A SOCKS5 client's bytes, read read_size(data[0]) bytes at a time."""
    if not data:
        return
    conn = SocksServerConnection()
    try:
        for part in chunks(data[1:], read_size(data[0])):
            answer, request = conn.receive(part)
            assert answer in (b"", b"\x05\x00"), answer
            if request is not None:
                assert 0 <= request.address.port <= 0xFFFF
                try:
                    conn.receive(b"more")
                except SocksError:
                    pass
                else:
                    raise AssertionError("bytes after the request were accepted")
                return
            # Memory guard: an unfinished greeting or request is at most 262 bytes.
            assert len(conn._buf) <= 262, len(conn._buf)
    except SocksError as exc:
        assert isinstance(exc.reply, bytes)


def _socks5_seeds() -> list[bytes]:
    greeting = b"\x05\x01\x00"
    out = []
    for command in (1, 2, 3):
        for a in ADDRESSES:
            out.append(b"\xff" + greeting + bytes([5, command, 0]) + encode_address(a))
    out.append(
        b"\x00" + b"\x05\x02\x02\x00" + b"\x05\x01\x00" + encode_address(ADDRESSES[4]) + b"GET"
    )
    return out


# --- control protocol, pairing, probes ---------------------------------------------------


CONTROL_WORDS = ("v", "id", "cmd", "ok", "result", "error", "code", "message", "status")


def control_lines(data: bytes) -> None:
    """A request line as braidd reads it, a reply line as the tray and the CLI read it."""
    data = json_input(data, CONTROL_WORDS, (control.PROTOCOL_VERSION,))
    try:
        request = control.decode_request(data)
    except ControlError as exc:
        assert exc.code in (control.ErrorCode.BAD_REQUEST, control.ErrorCode.UNSUPPORTED_VERSION)
    else:
        assert isinstance(request, dict) and isinstance(request["cmd"], str)
        control.ok(request.get("id"), None)  # braidd answers with the id it was given
    try:
        reply = control.decode_reply(data)
    except ControlError:
        pass
    else:
        assert isinstance(reply, dict)


def _control_seeds() -> list[bytes]:
    return [
        b"\x00" + control.encode({"id": 7, "cmd": "status"}),
        b"\x00" + control.encode({"id": "x", "cmd": "link", "name": "eth0", "priority": "backup"}),
        b"\x00" + control.ok(7, {"links": [], "tunnel": {"pool_ready": 4}}),
        b"\x00" + control.error(7, control.ErrorCode.FORBIDDEN, "no"),
    ]


def pairing(data: bytes) -> None:
    """data[0] even: a pairing URI as pasted; odd: pairing.json (json_input) as braidd reads it."""
    if not data:
        return
    if data[0] % 2 == 0:
        uri = text(data[1:])
        try:
            found = parse_pairing(uri)
        except PairingError:
            pass
        else:
            assert 0 < found.port <= 0xFFFF and len(found.fingerprint) == 64
            assert parse_pairing(found.uri()) == found
        with contextlib.suppress(PairingError):
            normalise_fingerprint(uri)
        return
    # braidd's service module pulls in the whole daemon: imported on first use, so not
    # instrumented (saved_pairing itself is a few lines around parse_pairing, which is).
    from braid.daemon.service import PAIRING_FILE, Daemon

    state_dir = scratch_dir()
    (state_dir / PAIRING_FILE).write_bytes(json_input(data[1:], ("uri",), tuple(PAIRING_URIS)))
    daemon = SimpleNamespace(config=SimpleNamespace(state_dir=state_dir))
    found = Daemon.saved_pairing(daemon)  # type: ignore[arg-type]
    assert found is None or isinstance(found, Pairing)


PAIRING_URIS = [
    Pairing("vps.example.org", 7443, "ab" * 32, "T" * 43).uri(),
    Pairing("2001:db8::1", 443, "0f" * 32, "tok_-en" * 4).uri(),
    "braid://192.0.2.1:1?fp=sha256:" + ":".join(["AB"] * 32) + "&token=" + "x" * 16,
]


def _pairing_seeds() -> list[bytes]:
    return [b"\x00" + u.encode() for u in PAIRING_URIS] + [
        b"\x01" + raw_json({"uri": u}) for u in PAIRING_URIS
    ]


PROBE_KEY = probe.key_from_token("fuzz-token-" * 4)


def probes(data: bytes) -> None:
    """data[0] even: a raw datagram; odd: the rest as a probe body, with its MAC made valid.

    The fuzzer cannot forge the HMAC, so the odd half signs whatever body it
    built to reach the checks behind the MAC.
    """
    if not data:
        return
    if data[0] % 2 == 0:
        datagram = data[1:]
    else:
        body = data[1:35]
        datagram = body + hmac.digest(PROBE_KEY, body, "sha256")[: probe.MAC_SIZE] + data[35:]
    found = probe.parse(PROBE_KEY, datagram)
    if found is None:
        return
    assert len(datagram) == probe.SIZE
    reply = probe.encode_reply(PROBE_KEY, found)
    assert len(reply) == len(datagram)  # never amplifies
    echoed = probe.parse(PROBE_KEY, reply)
    assert echoed is not None and echoed.type is probe.ProbeType.REPLY
    assert (echoed.link, echoed.seq, echoed.stamp, echoed.nonce, echoed.sent_ms) == (
        found.link,
        found.seq,
        found.stamp,
        found.nonce,
        found.sent_ms,
    )


def _probe_seeds() -> list[bytes]:
    request = probe.encode_request(PROBE_KEY, 3, 77, 123456789, bytes(range(8)))
    return [b"\x00" + request, b"\x01" + request[:34], b"\x01" + request[:34] + b"x"]


DATAGRAM_SESSION = (b"\x5a" * dg.SESSION_ID_SIZE, b"\x17" * dg.KEY_SIZE)


def datagrams(data: bytes) -> None:
    """data[0] even: a raw datagram at the server; odd: the rest as a plaintext, sealed validly.

    The fuzzer cannot forge the AEAD tag, so the odd half seals whatever plaintext it built to
    reach the parser behind it; both halves go through the replay and copy windows.
    """
    if not data:
        return
    server = dg.Sealer(*DATAGRAM_SESSION, dg.DOWN)
    if data[0] % 2 == 0:
        datagram = data[1:]
    else:
        client = dg.Sealer(*DATAGRAM_SESSION, dg.UP)
        datagram = client.seal(dg.Packet(dg.Kind.PING, 0))
        # Reseal the fuzzer's plaintext under the next nonce, as a client would.
        header = datagram[: dg.HEADER_SIZE]
        nonce = (dg.UP).to_bytes(4, "big") + header[10:18]
        datagram = header + ChaCha20Poly1305(DATAGRAM_SESSION[1]).encrypt(nonce, data[1:], header)
    opened = server.open(datagram)
    if opened is None:
        return
    seq, packet = opened
    window = dg.ReplayWindow(64)
    assert window.check(seq) and not window.check(seq)
    assert packet.kind in dg.Kind
    if packet.kind is dg.Kind.DATA:
        # The destination is only ever resolved and checked by the server's policy, never
        # encoded again, so a name the encoder would refuse is no finding here.
        assert packet.address is not None and isinstance(packet.payload, bytes)
        assert 0 <= packet.flow < 2**32 and 0 <= packet.number < 2**32


def _datagram_seeds() -> list[bytes]:
    client = dg.Sealer(*DATAGRAM_SESSION, dg.UP)
    data = dg.Packet(dg.Kind.DATA, 1, 3, 5, 0, 0, 9, 1, Address("198.18.0.1", 7), b"hi")
    return [
        b"\x00" + client.seal(data),
        b"\x01" + dg.encode_plain(data),
        b"\x01" + dg.encode_plain(dg.Packet(dg.Kind.CLOSE, 255, flow=4)),
    ]


# --- files ----------------------------------------------------------------------------


def versioned_json(data: bytes) -> None:
    """braid.files.read_versioned_json: the object, or None and one problem reported."""
    path = scratch_dir() / "state.json"
    path.write_bytes(json_input(data, ("version", "x")))
    problems: list[str] = []
    found = read_versioned_json(path, 1, problems)
    if found is None:
        assert len(problems) == 1 and not path.exists()
    else:
        assert isinstance(found, dict) and found["version"] == 1 and not problems


def _versioned_json_seeds() -> list[bytes]:
    return [raw_json({"version": 1, "x": [1, 2.5, "y", None, True]}), raw_json({"version": 2})]


SETTINGS_WORDS = json_words(("version", "settings"), tuple(BY_KEY))
SETTINGS_WORDS += json_words(*(s.choices for s in BY_KEY.values()), ("192.0.2.10", "2001:db8::/48"))


def daemon_settings(data: bytes) -> None:
    """braidd's settings.json: bad values are reported and skipped, never raised."""
    state_dir = scratch_dir()
    (state_dir / SETTINGS_FILE).write_bytes(json_input(data, SETTINGS_WORDS, (SETTINGS_FORMAT,)))
    settings = Settings(state_dir).load()
    for key, value in settings.values.items():
        assert BY_KEY[key].check(value) == value


def _settings_seeds() -> list[bytes]:
    values = {s.key: s.default for s in BY_KEY.values()}
    values |= {"mode": "system", "bypass": ["192.0.2.10", "2001:db8::/48"], "pool_size": 32}
    return [raw_json({"version": SETTINGS_FORMAT, "settings": values})]


LINK_WORDS = ("version", "links", "usage", "wwan0", "eth0", "kind", "priority", "order")
LINK_WORDS += ("metered", "cap", "limit_bytes", "period", "reset_day", "then", "bytes")
LINK_WORDS += ("day", "month", "always", "backup", "never", "ethernet", "wifi", "cellular")


def link_store(data: bytes) -> None:
    """braidd's links.json and usage.json (the two halves of the input), then their use."""
    links, usage = split(data)
    state_dir = scratch_dir()
    (state_dir / LINKS_FILE).write_bytes(json_input(links, LINK_WORDS, (LINKS_FORMAT, 28)))
    (state_dir / USAGE_FILE).write_bytes(json_input(usage, LINK_WORDS, (LINKS_FORMAT,)))
    store = LinkStore(state_dir).load()
    for name, choice in store.choices.items():
        assert isinstance(choice, LinkChoice)
        LinkChoice.from_json(choice.to_json())
        store.used(name)
        store.count(name, 1000, now=0.0)
    for name in list(store.usage):
        store.used(name)


def _link_store_seeds() -> list[bytes]:
    cap = Cap(5 * 10**9, "month", 12).to_json()
    links = {
        "wwan0": {"kind": "cellular", "priority": "backup", "metered": True, "cap": cap},
        "eth0": {"kind": "ethernet", "priority": "always", "order": 0},
        "wlan0": {"priority": None, "cap": Cap(10**6, "day").to_json()},
    }
    usage = {"wwan0": {"period": "2024-05-12", "bytes": 123}}
    return [
        join(
            raw_json({"version": LINKS_FORMAT, "links": links}),
            raw_json({"version": LINKS_FORMAT, "usage": usage}),
        )
    ]


SERVER_WORDS = ("format", "listen", "public_host", "token_sha256", "policy", "allow", "deny")
SERVER_WORDS += ("devices", "name", "added", "first-device")
SERVER_WORDS += ("timeouts", "handshake", "idle", "connect", "udp_idle", "0.0.0.0:7443", "[::]:1")
SERVER_WORDS += ("vps.example.org", "2001:db8::5", "ab" * 32, "10.0.0.0/8", "fe80::/10")


def server_config(data: bytes) -> None:
    """braid-server's server.json: a config, or StateError naming the bad setting."""
    state_dir = scratch_dir()
    (state_dir / CONFIG_NAME).write_bytes(json_input(data, SERVER_WORDS, (1, 30)))
    try:
        config = StateDir(state_dir).load()
    except StateError:
        return
    assert ServerConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    for name, seconds in vars(config.timeouts).items():
        assert 0 < seconds < math.inf, (name, seconds)  # asyncio cannot schedule NaN
    config.policy()
    assert config.listen


def _server_config_seeds() -> list[bytes]:
    configs = [
        ServerConfig("0.0.0.0", 7443, "vps.example.org", [Device("laptop", "ab" * 32)]),
        ServerConfig(
            "::",
            443,
            "2001:db8::5",
            [Device("a", "0f" * 32, "2026-01-01"), Device("b.c_d-e", "1f" * 32)],
            ["127.0.0.0/8"],
            ["10.9.0.0/16"],
            Timeouts(5, 60),
        ),
    ]
    old = {"format": 1, "listen": "[::]:1", "public_host": "vps.example.org"}
    return [raw_json(c.to_json()) for c in configs] + [raw_json({**old, "token_sha256": "ab" * 32})]


def dns(data: bytes) -> None:
    """braid-server's DNS relay: a client's query and a nameserver's answer; resolv.conf."""
    query, answer = split(data)
    if is_query(query):
        assert 0 <= message_id(query) <= 0xFFFF
    is_truncated(answer)
    if is_answer_to(answer, query):
        assert answer[:2] == query[:2]
        assert question(answer)[:3] == question(query)[:3]  # type: ignore[index]
    asked = question(query)
    assert asked is None or asked[3] <= len(query)
    if len(query) >= 12:
        refusal = error_answer(query, 2)
        assert refusal[:2] == query[:2] and refusal[3] & 0x0F == 2
    servers = parse_resolv_conf(data.decode(errors="replace"))  # as Resolver reads it
    assert len(servers) <= 3 and len(set(servers)) == len(servers)


def _dns_seeds() -> list[bytes]:
    query = bytes.fromhex("abcd01000001000000000000076578616d706c6503636f6d0000010001")
    answer = bytes([0xAB, 0xCD, 0x81, 0x80]) + query[4:] + bytes(16)
    conf = b"# resolv.conf\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\noptions edns0\n"
    return [join(query, answer), join(query, bytes([0xAB, 0xCD, 0x83])), conf]


# --- the list -------------------------------------------------------------------------

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "tunnel_handshake", tunnel_handshake, _tunnel_handshake_seeds, dictionary=(b"BRAID",)
        ),
        Target("tunnel_messages", tunnel_messages, _tunnel_messages_seeds, dictionary=(b"xn--",)),
        Target("tunnel_frames", tunnel_frames, _tunnel_frames_seeds, max_len=2 * FRAME_MAX + 16),
        Target(
            "address",
            address,
            _address_seeds,
            dictionary=(b"xn--", b"\x00", b"."),
        ),
        Target("socks5", socks5, _socks5_seeds, dictionary=(b"xn--",)),
        Target(
            "control",
            control_lines,
            _control_seeds,
            max_len=control.MAX_LINE + 16,
            dictionary=json_dictionary(CONTROL_WORDS),
        ),
        Target(
            "pairing",
            pairing,
            _pairing_seeds,
            dictionary=(b"braid://", b"?fp=", b"&token=", b"sha256:", b"[", b"]", b"%", b'"uri"'),
        ),
        Target("probe", probes, _probe_seeds, dictionary=(probe.MAGIC,)),
        Target("datagram", datagrams, _datagram_seeds, dictionary=(dg.MAGIC,)),
        Target(
            "versioned_json",
            versioned_json,
            _versioned_json_seeds,
            dictionary=json_dictionary(("version",)),
        ),
        Target(
            "daemon_settings",
            daemon_settings,
            _settings_seeds,
            dictionary=json_dictionary(SETTINGS_WORDS),
        ),
        Target("link_store", link_store, _link_store_seeds, dictionary=json_dictionary(LINK_WORDS)),
        Target(
            "server_config",
            server_config,
            _server_config_seeds,
            dictionary=json_dictionary(SERVER_WORDS),
        ),
        Target("dns", dns, _dns_seeds, dictionary=(b"nameserver", b"\n", b"%", b"::")),
    )
}


def seed_name(data: bytes) -> str:
    return "seed-" + hashlib.sha1(data).hexdigest()
