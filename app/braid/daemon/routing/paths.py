"""Subflows per connection: the kernel's userspace MPTCP path manager, driven by braidd.

The in-kernel path manager opens a subflow on every endpoint as soon as a connection is
established, so a pooled tunnel has all of its subflows up before its flow's first byte and a
30 KiB answer is spread over every link and waits for the slowest. With
``net.mptcp.path_manager = userspace`` the kernel opens no subflow by itself; braidd decides per
connection (see :mod:`braid.daemon.tunnel.spread`) and asks for each one here:

- ``create``: a subflow of connection ``token`` from a link's address and device to the server
  (MPTCP_PM_CMD_SUBFLOW_CREATE), as a backup subflow or not;
- ``remove``: withdraw one local address id from a connection (MPTCP_PM_CMD_REMOVE): its
  subflows close, the kernel resends their data on the others, and RM_ADDR tells the server to
  stop sending on them too, which matters when the link is dead (a FIN or reset sent into a
  blackhole never arrives, and the server would keep sending into it);
- ``destroy``: close one subflow (MPTCP_PM_CMD_SUBFLOW_DESTROY), on a link that works;
- ``set_backup``: flip one subflow's backup bit (MPTCP_PM_CMD_SET_FLAGS with a token), which
  tells the server through MP_PRIO.

``subflows(sock)`` lists a connection's subflows (MPTCP_SUBFLOW_ADDRS) and ``token(sock)`` reads
its token (MPTCP_INFO). ``watch_connections`` follows the kernel's MPTCP events, so that braidd
also opens subflows for the laptop's other MPTCP connections, which the userspace path manager
leaves alone otherwise. The sysctl is per network namespace; its old value is recorded in the
state directory before it is changed, and put back on stop and by ``cleanup`` after a crash.

The netlink calls block for a few microseconds; braidd makes them on its netlink thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, genlmsg, nla
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import GenericNetlinkSocket

from braid.files import load_json, write_json
from braid.transport import SOL_MPTCP, mptcp_info

log = logging.getLogger(__name__)

SYSCTL_DIR = Path("/proc/sys/net/mptcp")
PM_FILE = "mptcp-path-manager.json"

CMD_SET_FLAGS = 7
CMD_REMOVE = 9
CMD_SUBFLOW_CREATE = 10
CMD_SUBFLOW_DESTROY = 11
FLAG_BACKUP = 4
NLA_F_NESTED = 0x8000

MPTCP_SUBFLOW_ADDRS = 3
# struct mptcp_info: six u8 counters, u32 flags, u32 token, then u64 write_seq and snd_una.
_TOKEN = struct.Struct("=12xI")
_SEQS = struct.Struct("=16xQQ")
_HEADER = struct.Struct("=IIII")  # struct mptcp_subflow_data
_SOCKADDR_STORAGE = 128
_ENTRY = 2 * _SOCKADDR_STORAGE  # struct mptcp_subflow_addrs: local, remote


class pm_msg(genlmsg):
    """The mptcp_pm family's request, with the per-connection attributes pyroute2 lacks."""

    prefix = "MPTCP_PM_ATTR_"
    nla_map = (
        ("MPTCP_PM_ATTR_UNSPEC", "none"),
        ("MPTCP_PM_ATTR_ADDR", "pm_addr"),
        ("MPTCP_PM_ATTR_RCV_ADD_ADDRS", "uint32"),
        ("MPTCP_PM_ATTR_SUBFLOWS", "uint32"),
        ("MPTCP_PM_ATTR_TOKEN", "uint32"),
        ("MPTCP_PM_ATTR_LOC_ID", "uint8"),
        ("MPTCP_PM_ATTR_ADDR_REMOTE", "pm_addr"),
    )

    class pm_addr(nla):
        prefix = "MPTCP_PM_ADDR_ATTR_"
        nla_map = (
            ("MPTCP_PM_ADDR_ATTR_UNSPEC", "none"),
            ("MPTCP_PM_ADDR_ATTR_FAMILY", "uint16"),
            ("MPTCP_PM_ADDR_ATTR_ID", "uint8"),
            ("MPTCP_PM_ADDR_ATTR_ADDR4", "ip4addr"),
            ("MPTCP_PM_ADDR_ATTR_ADDR6", "ip6addr"),
            ("MPTCP_PM_ADDR_ATTR_PORT", "uint16"),  # host order, as the kernel reads it
            ("MPTCP_PM_ADDR_ATTR_FLAGS", "uint32"),
            ("MPTCP_PM_ADDR_ATTR_IF_IDX", "int32"),
        )


class event_msg(genlmsg):
    """An MPTCP event of the mptcp_pm_events group (include/uapi/linux/mptcp_pm.h)."""

    prefix = "MPTCP_ATTR_"
    nla_map = (
        ("MPTCP_ATTR_UNSPEC", "none"),
        ("MPTCP_ATTR_TOKEN", "uint32"),
        ("MPTCP_ATTR_FAMILY", "uint16"),
        ("MPTCP_ATTR_LOC_ID", "uint8"),
        ("MPTCP_ATTR_REM_ID", "uint8"),
        ("MPTCP_ATTR_SADDR4", "ip4addr"),
        ("MPTCP_ATTR_SADDR6", "ip6addr"),
        ("MPTCP_ATTR_DADDR4", "ip4addr"),
        ("MPTCP_ATTR_DADDR6", "ip6addr"),
        ("MPTCP_ATTR_SPORT", "be16"),  # network order in events
        ("MPTCP_ATTR_DPORT", "be16"),
        ("MPTCP_ATTR_BACKUP", "uint8"),
        ("MPTCP_ATTR_ERROR", "uint8"),
        ("MPTCP_ATTR_FLAGS", "uint16"),
        ("MPTCP_ATTR_TIMEOUT", "uint32"),
        ("MPTCP_ATTR_IF_IDX", "int32"),
        ("MPTCP_ATTR_RESET_REASON", "uint32"),
        ("MPTCP_ATTR_RESET_FLAGS", "uint32"),
        ("MPTCP_ATTR_SERVER_SIDE", "uint8"),
    )


EVENT_ESTABLISHED = 2


@dataclass(frozen=True)
class Established:
    """A connection of this namespace became fully established (MPTCP_EVENT_ESTABLISHED)."""

    token: int
    family: int
    local: tuple[str, int]
    remote: tuple[str, int]
    server_side: bool


def parse_event(msg) -> Established | None:
    """The ESTABLISHED event in a message of the events group; None for any other event."""
    if msg.get("cmd") != EVENT_ESTABLISHED:
        return None
    family = msg.get_attr("MPTCP_ATTR_FAMILY")
    token = msg.get_attr("MPTCP_ATTR_TOKEN")
    v6 = family == socket.AF_INET6
    saddr = msg.get_attr("MPTCP_ATTR_SADDR6" if v6 else "MPTCP_ATTR_SADDR4")
    daddr = msg.get_attr("MPTCP_ATTR_DADDR6" if v6 else "MPTCP_ATTR_DADDR4")
    if token is None or saddr is None or daddr is None:
        return None
    return Established(
        token=token,
        family=socket.AF_INET6 if v6 else socket.AF_INET,
        local=(plain_address(saddr), msg.get_attr("MPTCP_ATTR_SPORT") or 0),
        remote=(plain_address(daddr), msg.get_attr("MPTCP_ATTR_DPORT") or 0),
        server_side=bool(msg.get_attr("MPTCP_ATTR_SERVER_SIDE")),
    )


def watch_connections(on_established, stopping) -> None:
    """Blocking: call ``on_established(Established)`` for every new connection until
    ``stopping()`` is true (checked after each batch of events)."""
    nl = GenericNetlinkSocket()
    try:
        nl.bind("mptcp_pm", event_msg)
        nl.add_membership("mptcp_pm_events")
        while not stopping():
            for msg in nl.get():
                event = parse_event(msg)
                if event is not None:
                    on_established(event)
    finally:
        with contextlib.suppress(Exception):
            nl.close()


@dataclass(frozen=True)
class Subflow:
    """One subflow of a connection, as the kernel lists it."""

    local: tuple[str, int]
    remote: tuple[str, int]


class PathManagerUnavailable(OSError):
    """This kernel has no userspace path manager (before Linux 5.19)."""


def plain_address(address: str) -> str:
    """``::ffff:198.18.1.2`` -> ``198.18.1.2``; other addresses unchanged."""
    return address.removeprefix("::ffff:") if "." in address else address


def token(sock: socket.socket) -> int | None:
    """The connection's MPTCP token, or None if it is not (or no longer) MPTCP."""
    info = mptcp_info(sock)
    if info is None or len(info) < _TOKEN.size:
        return None
    return _TOKEN.unpack_from(info)[0] or None


def unacknowledged(sock: socket.socket) -> bool:
    """True while data sent on the connection waits for the peer's acknowledgement."""
    info = mptcp_info(sock)
    if info is None or len(info) < _SEQS.size:
        return False
    write_seq, snd_una = _SEQS.unpack_from(info)
    return write_seq != snd_una


_libc = ctypes.CDLL(None, use_errno=True)
_libc.getsockopt.argtypes = [
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint32),
]


def _sockaddr(raw: bytes) -> tuple[str, int] | None:
    family, port = struct.unpack_from("=HH", raw)
    port = socket.ntohs(port)
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6:
        return plain_address(socket.inet_ntop(socket.AF_INET6, raw[8:24])), port
    return None


def subflows(sock: socket.socket, most: int = 16) -> list[Subflow]:
    """The connection's subflows (MPTCP_SUBFLOW_ADDRS); empty if it is not MPTCP.

    The kernel reads a header from the buffer before it fills it, which Python's
    ``getsockopt`` cannot pass: hence ctypes.
    """
    size = _HEADER.size + most * _ENTRY
    buf = ctypes.create_string_buffer(size)
    _HEADER.pack_into(buf, 0, _HEADER.size, 0, 0, _ENTRY)
    length = ctypes.c_uint32(size)
    try:
        fd = sock.fileno()
    except OSError:
        return []
    if fd < 0 or _libc.getsockopt(fd, SOL_MPTCP, MPTCP_SUBFLOW_ADDRS, buf, length) != 0:
        return []
    _, count, _, used = _HEADER.unpack_from(buf, 0)
    out: list[Subflow] = []
    raw = bytes(buf)
    for i in range(min(count, most)):
        base = _HEADER.size + i * used
        local = _sockaddr(raw[base : base + _SOCKADDR_STORAGE])
        remote = _sockaddr(raw[base + _SOCKADDR_STORAGE : base + _ENTRY])
        if local and remote:
            out.append(Subflow(local, remote))
    return out


def _addr(address: str, *, port: int | None = None, **extra: int) -> dict:
    ip = ipaddress.ip_address(address)
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    key = "MPTCP_PM_ADDR_ATTR_ADDR4" if ip.version == 4 else "MPTCP_PM_ADDR_ATTR_ADDR6"
    attrs: list[tuple[str, object]] = [("MPTCP_PM_ADDR_ATTR_FAMILY", family), (key, str(ip))]
    if port is not None:
        attrs.append(("MPTCP_PM_ADDR_ATTR_PORT", port))
    for name, value in extra.items():
        attrs.append((f"MPTCP_PM_ADDR_ATTR_{name.upper()}", value))
    return {"attrs": attrs}


class PathManager:
    """Per-connection subflow commands, and the namespace's path-manager sysctl."""

    def __init__(self, state_dir: Path | None = None, sysctl_dir: Path = SYSCTL_DIR) -> None:
        self._state_dir = state_dir
        self._sysctl_dir = sysctl_dir
        self._nl: GenericNetlinkSocket | None = None
        self.active = False

    # -- the sysctl -----------------------------------------------------------

    def _sysctl(self) -> tuple[Path, str] | None:
        """The file and the value that selects the userspace path manager on this kernel."""
        named = self._sysctl_dir / "path_manager"  # Linux 6.15 and later
        if named.exists():
            return named, "userspace"
        numbered = self._sysctl_dir / "pm_type"  # 5.19 to 6.14: 1 is userspace
        if numbered.exists():
            return numbered, "1"
        return None

    def enable(self) -> None:
        """Select the userspace path manager for new connections; raises PathManagerUnavailable."""
        found = self._sysctl()
        if found is None:
            raise PathManagerUnavailable(
                errno.ENOENT, "this kernel has no userspace MPTCP path manager (Linux 5.19+)"
            )
        path, value = found
        old = path.read_text().strip()
        if old != value and self._state_dir is not None:
            record = self._state_dir / PM_FILE
            if not record.exists():  # a crashed run's record holds the true original
                record.parent.mkdir(parents=True, exist_ok=True)
                write_json(record, {"file": path.name, "value": old})
        if old != value:
            path.write_text(value)
            log.info("MPTCP path manager: %s (was %s); braidd opens the subflows", value, old)
        self._open()
        self.active = True

    def restore(self) -> None:
        """Put back the path manager recorded by ``enable`` (also after a crash)."""
        self.active = False
        if self._state_dir is None:
            return
        record = self._state_dir / PM_FILE
        try:
            saved = load_json(record.read_text())
            name, value = str(saved["file"]), str(saved["value"])
            if name not in ("path_manager", "pm_type") or not value.isprintable():
                raise ValueError(f"unexpected {name!r}")
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cannot read %s (%s); leaving the MPTCP path manager as it is", record, exc)
            return
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("%s is damaged (%r); leaving the MPTCP path manager as it is", record, exc)
            with contextlib.suppress(OSError):
                record.unlink()
            return
        try:
            (self._sysctl_dir / name).write_text(value)
        except OSError as exc:
            log.warning("cannot restore net.mptcp.%s to %s: %s", name, value, exc)
            return
        record.unlink(missing_ok=True)
        log.info("MPTCP path manager restored to %s", value)

    def close(self) -> None:
        if self._nl is not None:
            with contextlib.suppress(Exception):
                self._nl.close()
            self._nl = None

    # -- per-connection commands ----------------------------------------------

    def _open(self) -> GenericNetlinkSocket:
        if self._nl is None:
            nl = GenericNetlinkSocket()
            nl.bind("mptcp_pm", pm_msg)
            self._nl = nl
        return self._nl

    def _request(self, cmd: int, attrs: list) -> None:
        nl = self._open()
        msg = pm_msg()
        msg["cmd"] = cmd
        msg["version"] = 1
        msg["attrs"] = attrs
        nl.nlm_request(msg, msg_type=nl.prid, msg_flags=NLM_F_REQUEST | NLM_F_ACK)

    def create(
        self,
        token: int,
        local: str,
        local_id: int,
        ifindex: int,
        remote: tuple[str, int],
        backup: bool = False,
    ) -> None:
        """Open a subflow of connection ``token`` from ``local`` on device ``ifindex``.

        Raises NetlinkError (e.g. ENOENT once the connection is gone).
        """
        self._request(
            CMD_SUBFLOW_CREATE,
            [
                ("MPTCP_PM_ATTR_TOKEN", token),
                (
                    "MPTCP_PM_ATTR_ADDR",
                    _addr(
                        local,
                        id=local_id,
                        if_idx=ifindex,
                        flags=FLAG_BACKUP if backup else 0,
                    ),
                    NLA_F_NESTED,
                ),
                ("MPTCP_PM_ATTR_ADDR_REMOTE", _addr(remote[0], port=remote[1]), NLA_F_NESTED),
            ],
        )

    def remove(self, token: int, local_id: int) -> None:
        """Withdraw address id ``local_id`` (0: the initial subflow's) from connection ``token``."""
        self._request(
            CMD_REMOVE,
            [("MPTCP_PM_ATTR_TOKEN", token), ("MPTCP_PM_ATTR_LOC_ID", local_id)],
        )

    def destroy(self, token: int, subflow: Subflow) -> None:
        """Close one subflow; the kernel resends what it had in flight on the others."""
        self._request(
            CMD_SUBFLOW_DESTROY,
            [
                ("MPTCP_PM_ATTR_TOKEN", token),
                (
                    "MPTCP_PM_ATTR_ADDR",
                    _addr(subflow.local[0], port=subflow.local[1]),
                    NLA_F_NESTED,
                ),
                (
                    "MPTCP_PM_ATTR_ADDR_REMOTE",
                    _addr(subflow.remote[0], port=subflow.remote[1]),
                    NLA_F_NESTED,
                ),
            ],
        )

    def set_backup(self, token: int, subflow: Subflow, backup: bool) -> None:
        """Mark one subflow backup (or not); the server learns it through MP_PRIO."""
        self._request(
            CMD_SET_FLAGS,
            [
                ("MPTCP_PM_ATTR_TOKEN", token),
                (
                    "MPTCP_PM_ATTR_ADDR",
                    _addr(subflow.local[0], flags=FLAG_BACKUP if backup else 0),
                    NLA_F_NESTED,
                ),
                (
                    "MPTCP_PM_ATTR_ADDR_REMOTE",
                    _addr(subflow.remote[0], port=subflow.remote[1]),
                    NLA_F_NESTED,
                ),
            ],
        )


def gone(exc: NetlinkError) -> bool:
    """The connection or subflow no longer exists: nothing to do, not an error."""
    return exc.code in (errno.ENOENT, errno.EINVAL, errno.ESRCH, errno.ENOTCONN)


__all__ = [
    "PathManager",
    "PathManagerUnavailable",
    "Subflow",
    "gone",
    "subflows",
    "token",
    "unacknowledged",
]
