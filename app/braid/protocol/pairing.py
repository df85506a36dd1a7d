"""Pairing URIs: everything a laptop needs to reach and trust its server.

    braid://HOST:PORT?fp=<sha256 of the server certificate, hex>&token=<token>

HOST may be a name, an IPv4 address or a bracketed IPv6 address.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, urlsplit

SCHEME = "braid"
_FP_RE = re.compile(r"^[0-9a-f]{64}$")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_\-]{16,255}$")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?$")


class PairingError(ValueError):
    """The text is not a usable pairing URI; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Pairing:
    host: str
    port: int
    fingerprint: str
    token: str

    def uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{SCHEME}://{host}:{self.port}?fp={self.fingerprint}&token={quote(self.token)}"

    @property
    def server(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def redacted(self) -> dict:
        """What may be shown or logged: everything but the token."""
        return {"host": self.host, "port": self.port, "fingerprint": self.fingerprint}


def normalise_fingerprint(text: str) -> str:
    fp = text.strip().lower()
    if fp.startswith("sha256:"):
        fp = fp[len("sha256:") :]
    fp = fp.replace(":", "")
    if not _FP_RE.match(fp):
        raise PairingError("the certificate fingerprint must be 64 hexadecimal digits (SHA-256)")
    return fp


def _is_host_name(host: str) -> bool:
    """A DNS name (international names in their IDNA form) or an IPv4 address."""
    try:
        name = host.encode("idna").decode("ascii")
    except UnicodeError:  # an empty or too long label
        return False
    return bool(_HOSTNAME_RE.match(name))


def parse_pairing(text: str) -> Pairing:
    text = text.strip()
    if not text:
        raise PairingError("the pairing URI is empty")
    try:
        parts = urlsplit(text)
    except ValueError as exc:  # e.g. "Invalid IPv6 URL" for an unclosed bracket
        raise PairingError(f"the pairing URI is not valid: {exc}") from None
    if parts.scheme != SCHEME:
        raise PairingError(f"a pairing URI starts with {SCHEME}:// (this one does not)")
    try:
        host = parts.hostname
        port = parts.port
    except ValueError as exc:
        raise PairingError(f"the server address is not valid: {exc}") from None
    if not host:
        raise PairingError("the pairing URI names no server host")
    if port is None:
        raise PairingError("the pairing URI names no server port")
    if port == 0:
        raise PairingError("the server port must be between 1 and 65535")
    if ":" in host:
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise PairingError(f"{host!r} is not a valid IPv6 address") from None
    elif not _is_host_name(host):
        # urlsplit takes whatever sits between "@" and ":" for the host (the fuzzer found
        # "braid://[::1]@y]:1?..."): such a pairing could not even be written back as a URI.
        raise PairingError(f"{host!r} is not a valid host name or address")
    query = parse_qs(parts.query, keep_blank_values=True)
    fp = query.get("fp", [""])[-1]
    token = query.get("token", [""])[-1]
    if not fp:
        raise PairingError("the pairing URI has no certificate fingerprint (fp=...)")
    if not token:
        raise PairingError("the pairing URI has no token (token=...)")
    if not _TOKEN_RE.match(token):
        raise PairingError("the token is malformed: was the URI cut short when it was copied?")
    return Pairing(host, port, normalise_fingerprint(fp), token)
