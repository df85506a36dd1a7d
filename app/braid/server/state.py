"""braid-server's state directory: configuration, certificate, key and devices.

DIR/server.json        settings and the devices, each with its token's SHA-256
                       (written last: its presence means the directory is initialised)
DIR/cert.pem           self-signed certificate the clients pin by fingerprint
DIR/key.pem            its private key (mode 0600)
DIR/devices-seen.json  what the running server saw of each device: last contact,
                       address, open tunnels, bytes (written by the server, read by
                       ``braid-server device list``)

Format 1 of server.json held a single ``token_sha256``; reading it upgrades the
file in place to format 2, that token becoming the device ``first-device``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import ipaddress
import json
import math
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from braid.files import load_json, write_atomic
from braid.server.policy import Policy, PolicyError
from braid.transport import fingerprint

FORMAT = 2
CONFIG_NAME = "server.json"
SEEN_NAME = "devices-seen.json"
UPGRADED_DEVICE = "first-device"  # the token of a format-1 server.json
MAX_DEVICES = 64
CERT_NAME = "cert.pem"
KEY_NAME = "key.pem"
CERT_DAYS = 3650

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?$")
_DEVICE_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,30}[A-Za-z0-9])?$")
_HASH_RE = re.compile(r"[0-9a-f]{64}")


class StateError(Exception):
    """The state directory is missing, unreadable or invalid; the message says which."""


# --- addresses ------------------------------------------------------------------


def parse_listen(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` (IPv6 in brackets, e.g. ``[::]:7443``) -> (address, port)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
    else:
        host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r}: expected ADDRESS:PORT, e.g. 0.0.0.0:7443 or [::]:7443")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address (write IPv6 as [::]:7443)") from None
    if ip.version == 6 and not text.startswith("["):
        raise ValueError(f"write an IPv6 listen address in brackets: [{host}]:{port_text}")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{port_text!r} is not a port number (1-65535)")
    return str(ip), int(port_text)


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_wildcard(host: str) -> bool:
    return ipaddress.ip_address(host).is_unspecified


def check_public_host(host: str) -> str:
    """A name or IP literal clients can reach; returned normalised (no brackets)."""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME_RE.match(host) or host.replace(".", "").isdigit():
            raise ValueError(f"{host!r} is neither a host name nor an IP address") from None
        return host.rstrip(".").lower()
    if ip.is_unspecified:
        raise ValueError(f"{host} is not an address clients can connect to")
    return str(ip)


# --- token ------------------------------------------------------------------------


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str | bytes) -> str:
    # The token is 256 random bits, not a password: nobody can guess it, so a
    # plain SHA-256 is enough and a slow password hash would only cost CPU per
    # connection.
    raw = token.encode() if isinstance(token, str) else token
    return hashlib.sha256(raw).hexdigest()


def token_matches(token: bytes, stored_hash: str) -> bool:
    return hmac.compare_digest(hashlib.sha256(token).digest(), bytes.fromhex(stored_hash))


def check_device_name(name: str) -> str:
    """A device name: 1 to 32 letters, digits, '.', '_' or '-', starting and ending with
    a letter or digit (it appears in logs and on the command line)."""
    if not _DEVICE_RE.match(name):
        raise ValueError(
            f"{name!r} is not a device name: use 1 to 32 letters, digits, '.', '_' or '-' "
            "(e.g. alice-laptop)"
        )
    return name


@dataclass(frozen=True)
class Device:
    """One device allowed to use the server: a name and its token's SHA-256."""

    name: str
    token_sha256: str
    added: str = ""  # ISO 8601, UTC

    def to_json(self) -> dict:
        return {"name": self.name, "token_sha256": self.token_sha256, "added": self.added}

    @classmethod
    def from_json(cls, data: object, where: str) -> Device:
        if not isinstance(data, dict):
            raise ValueError(f"{where} must be an object")
        name = data.get("name")
        if not isinstance(name, str):
            raise ValueError(f"{where}.name must be a string")
        try:
            check_device_name(name)
        except ValueError as exc:
            raise ValueError(f"{where}.name: {exc}") from None
        token_hash = data.get("token_sha256")
        if not isinstance(token_hash, str) or not _HASH_RE.fullmatch(token_hash):
            raise ValueError(f"{where}.token_sha256 must be 64 lower-case hex digits")
        added = data.get("added", "")
        if not isinstance(added, str) or len(added) > 64:
            raise ValueError(f"{where}.added must be a date")
        return cls(name, token_hash, added)


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()


# --- configuration -------------------------------------------------------------------


def is_positive_seconds(value: object) -> bool:
    """A JSON number of seconds above zero: not a boolean, not NaN, not infinite, not huge."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return 0 < float(value) < math.inf  # false for NaN
    except OverflowError:  # an integer of hundreds of digits
        return False


@dataclass
class Timeouts:
    handshake: float = 10.0  # TCP accept to HELLO read, TLS included
    idle: float = 300.0  # AUTH_OK sent to REQUEST read: the client's warm pool
    connect: float = 10.0  # name resolution and connecting to the destination
    udp_idle: float = 120.0  # a UDP or DNS session with no datagram either way ends


@dataclass
class ServerConfig:
    listen_host: str
    listen_port: int
    public_host: str
    devices: list[Device]
    allow: list[str] = field(default_factory=list)
    deny: list[str] = field(default_factory=list)
    timeouts: Timeouts = field(default_factory=Timeouts)

    @property
    def listen(self) -> str:
        return format_hostport(self.listen_host, self.listen_port)

    def policy(self) -> Policy:
        return Policy.from_config(self.allow, self.deny)

    def device(self, name: str) -> Device | None:
        """The device called ``name`` (case-insensitively), if any."""
        for device in self.devices:
            if device.name.lower() == name.lower():
                return device
        return None

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "listen": self.listen,
            "public_host": self.public_host,
            "devices": [d.to_json() for d in self.devices],
            "policy": {"allow": list(self.allow), "deny": list(self.deny)},
            "timeouts": {
                "handshake": self.timeouts.handshake,
                "idle": self.timeouts.idle,
                "connect": self.timeouts.connect,
                "udp_idle": self.timeouts.udp_idle,
            },
        }

    @classmethod
    def from_json(cls, data: object) -> ServerConfig:
        """Validate what was read (format 1 or 2); raises ValueError naming the bad setting."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        version = data.get("format")
        if version not in (1, FORMAT) or isinstance(version, bool):
            raise ValueError(f"format {version!r} is not {FORMAT} (written by another version?)")
        host, port = parse_listen(str(data.get("listen", "")))
        public = check_public_host(str(data.get("public_host", "")))
        if version == 1:
            token_hash = str(data.get("token_sha256", ""))
            if not _HASH_RE.fullmatch(token_hash):
                raise ValueError("token_sha256 must be 64 lower-case hex digits")
            devices = [Device(UPGRADED_DEVICE, token_hash, "")]
        else:
            raw_devices = data.get("devices")
            if not isinstance(raw_devices, list):
                raise ValueError("devices must be a list")
            if len(raw_devices) > MAX_DEVICES:
                raise ValueError(f"devices: at most {MAX_DEVICES}")
            devices = [Device.from_json(d, f"devices[{i}]") for i, d in enumerate(raw_devices)]
            names = [d.name.lower() for d in devices]
            if len(set(names)) != len(names):
                raise ValueError("devices: two devices have the same name")
            hashes = [d.token_sha256 for d in devices]
            if len(set(hashes)) != len(hashes):
                raise ValueError("devices: two devices have the same token")
        policy = data.get("policy", {})
        if not isinstance(policy, dict):
            raise ValueError("policy must be an object")
        allow, deny = policy.get("allow", []), policy.get("deny", [])
        if not isinstance(allow, list) or not isinstance(deny, list):
            raise ValueError("policy.allow and policy.deny must be lists of networks")
        try:
            Policy.from_config(allow, deny)
        except PolicyError as exc:
            raise ValueError(str(exc)) from None
        raw_timeouts = data.get("timeouts", {})
        if not isinstance(raw_timeouts, dict):
            raise ValueError("timeouts must be an object")
        timeouts = Timeouts()
        for name in ("handshake", "idle", "connect", "udp_idle"):
            if name in raw_timeouts:
                value = raw_timeouts[name]
                if not is_positive_seconds(value):
                    raise ValueError(f"timeouts.{name} must be a positive number of seconds")
                setattr(timeouts, name, float(value))
        return cls(host, port, public, devices, list(allow), list(deny), timeouts)


# --- files --------------------------------------------------------------------------


def make_certificate(public_host: str) -> tuple[bytes, bytes]:
    """A self-signed ECDSA P-256 certificate for ``public_host``: (cert PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    # The host name alone, as any self-signed web server's: nothing names the service.
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, public_host)])
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(public_host))
    except ValueError:
        san = x509.DNSName(public_host)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class StateDir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.config_path = self.path / CONFIG_NAME
        self.cert_path = self.path / CERT_NAME
        self.key_path = self.path / KEY_NAME
        self.seen_path = self.path / SEEN_NAME

    def is_initialised(self) -> bool:
        try:
            return self.config_path.is_file()
        except OSError:
            return False

    def create(self, config: ServerConfig) -> None:
        """Make the directory with a fresh certificate and key, then the configuration."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        cert_pem, key_pem = make_certificate(config.public_host)
        write_atomic(self.key_path, key_pem, 0o600)
        write_atomic(self.cert_path, cert_pem, 0o644)
        self.save(config)

    def save(self, config: ServerConfig) -> None:
        text = json.dumps(config.to_json(), indent=2) + "\n"
        write_atomic(self.config_path, text.encode(), 0o600)

    def load(self) -> ServerConfig:
        """The configuration; a format-1 file is upgraded in place first (if it can be written:
        else the upgrade is made again at the next load)."""
        config, version = self._read()
        if version != FORMAT:
            with contextlib.suppress(OSError):
                self.save(config)
        return config

    def _read(self) -> tuple[ServerConfig, int]:
        try:
            text = self.config_path.read_text()
        except FileNotFoundError:
            raise StateError(
                f"{self.path} is not initialised (no {CONFIG_NAME}): run braid-server init first"
            ) from None
        except OSError as exc:
            raise StateError(f"cannot read {self.config_path}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise StateError(f"{self.config_path} is not UTF-8 text: {exc}") from None
        try:
            data = load_json(text)
            return ServerConfig.from_json(data), data["format"]
        except ValueError as exc:  # JSONDecodeError and nesting too deep included
            raise StateError(f"{self.config_path} is invalid: {exc}") from None

    def certificate_der(self) -> bytes:
        try:
            pem = self.cert_path.read_bytes()
        except FileNotFoundError:
            raise StateError(
                f"the certificate {self.cert_path} is missing; "
                "move the state directory away and run braid-server init again"
            ) from None
        except OSError as exc:
            raise StateError(f"cannot read {self.cert_path}: {exc.strerror}") from None
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise StateError(f"{self.cert_path} is not a PEM certificate") from None
        return cert.public_bytes(serialization.Encoding.DER)

    def fingerprint(self) -> str:
        return fingerprint(self.certificate_der())


# --- what the running server saw of each device ----------------------------------------


@dataclass
class DeviceSeen:
    """A device's activity as the server last saw it."""

    last_contact: float = 0.0  # Unix time of its last authenticated connection
    address: str = ""  # where that came from
    open: int = 0  # tunnels open when the file was written
    bytes_up: int = 0  # from the device, since it was added
    bytes_down: int = 0

    def to_json(self) -> dict:
        return dict(vars(self))

    @classmethod
    def from_json(cls, data: object) -> DeviceSeen:
        seen = cls()
        if isinstance(data, dict):
            for name, default in vars(cls()).items():
                value = data.get(name)
                if type(value) is type(default) or (
                    isinstance(default, float) and type(value) is int
                ):
                    setattr(seen, name, value)
        return seen


def read_seen(state: StateDir) -> tuple[float, dict[str, DeviceSeen]]:
    """(when the server wrote it, activity per device name); (0, {}) if there is none.

    Only the server writes this file and nothing depends on it but the listing:
    an unreadable one is as good as none.
    """
    try:
        data = load_json(state.seen_path.read_bytes()[: 1 << 20])
    except (OSError, ValueError):
        return 0.0, {}
    if not isinstance(data, dict) or not isinstance(data.get("devices"), dict):
        return 0.0, {}
    written = data.get("written")
    written = float(written) if isinstance(written, int | float) and math.isfinite(written) else 0.0
    devices = {
        str(k): DeviceSeen.from_json(v) for k, v in list(data["devices"].items())[:MAX_DEVICES]
    }
    return written, devices


def write_seen(state: StateDir, written: float, devices: dict[str, DeviceSeen]) -> None:
    data = {"written": written, "devices": {k: v.to_json() for k, v in devices.items()}}
    write_atomic(state.seen_path, (json.dumps(data, indent=2) + "\n").encode(), 0o600)
