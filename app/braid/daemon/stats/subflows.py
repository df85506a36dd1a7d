"""How many of braidd's MPTCP subflows leave from each local address to the server.

MPTCP subflows are TCP sockets in the kernel's tables, marked by their upper-layer protocol
("mptcp", as `ss -i` shows it as tcp-ulp-mptcp). One sock_diag dump of the established TCP
sockets, with that mark, gives them all at once: far cheaper than asking every connection for
MPTCP_FULL_INFO. Only subflows to the server's own address and port count: an ordinary TCP
connection to the same port of another host (HTTPS, when the server listens on 443), or to the
server itself without MPTCP, is not a tunnel.

The dump is a blocking read: call it off the event loop.
"""

from __future__ import annotations

import collections
import socket
import struct
from collections.abc import Iterable, Iterator

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_TCP_ESTABLISHED = 1
_INET_DIAG_INFO = 2  # asking for it brings the ULP attribute along
_INET_DIAG_ULP_INFO = 19
_INET_ULP_INFO_NAME = 1

_NLMSG = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBxI")  # family, protocol, extensions, states (then the socket id)
_REQ_ID = bytes(48)  # any socket: zero ports and addresses
_MSG = struct.Struct(">BBBBHH16s16s")  # family, state, timer, retrans, sport, dport, src, dst
_MSG_SIZE = 72  # inet_diag_msg
_ATTR = struct.Struct("=HH")
_RECV = 1 << 16


def _plain(address: str) -> str:
    return address.removeprefix("::ffff:")


def _address(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return _plain(socket.inet_ntop(socket.AF_INET6, raw[:16]))


def _attributes(data: bytes, offset: int, end: int) -> Iterator[tuple[int, bytes]]:
    while offset + _ATTR.size <= end:
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size or offset + length > end:
            return
        yield kind & 0x3FFF, data[offset + _ATTR.size : offset + length]
        offset += (length + 3) & ~3


def _is_mptcp(attributes: Iterable[tuple[int, bytes]]) -> bool:
    for kind, value in attributes:
        if kind != _INET_DIAG_ULP_INFO:
            continue
        for inner, name in _attributes(value, 0, len(value)):
            if inner == _INET_ULP_INFO_NAME and name.rstrip(b"\0") == b"mptcp":
                return True
    return False


def mptcp_subflows(family: int) -> Iterator[tuple[str, int, str, int]]:
    """(local address, local port, remote address, remote port) of every established MPTCP
    subflow of one address family, from one sock_diag dump."""
    with socket.socket(
        socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG
    ) as nl:
        nl.settimeout(2.0)
        body = (
            _REQ.pack(family, socket.IPPROTO_TCP, 1 << (_INET_DIAG_INFO - 1), 1 << _TCP_ESTABLISHED)
            + _REQ_ID
        )
        header = _NLMSG.pack(
            _NLMSG.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0
        )
        nl.send(header + body)
        while True:
            data = nl.recv(_RECV)
            offset = 0
            while offset + _NLMSG.size <= len(data):
                length, kind, _, _, _ = _NLMSG.unpack_from(data, offset)
                if length < _NLMSG.size or offset + length > len(data):
                    return
                if kind == _NLMSG_DONE:
                    return
                if kind == _NLMSG_ERROR:
                    (errno,) = struct.unpack_from("=i", data, offset + _NLMSG.size)
                    raise OSError(-errno, "sock_diag dump failed")
                start = offset + _NLMSG.size
                if length >= _NLMSG.size + _MSG_SIZE:
                    fam, _, _, _, sport, dport, src, dst = _MSG.unpack_from(data, start)
                    if _is_mptcp(_attributes(data, start + _MSG_SIZE, offset + length)):
                        yield _address(fam, src), sport, _address(fam, dst), dport
                offset += (length + 3) & ~3


def count_subflows(server: Iterable[str], port: int) -> dict[str, int]:
    """Established MPTCP subflows to one of ``server``'s addresses at ``port``, counted by local
    address (IPv4-mapped addresses written as IPv4)."""
    remotes = {_plain(address) for address in server}
    counts: collections.Counter[str] = collections.Counter()
    if not remotes:
        return {}
    families = {socket.AF_INET6 if ":" in address else socket.AF_INET for address in remotes}
    families.add(socket.AF_INET6)  # an IPv6 socket may reach an IPv4 server, mapped
    for family in sorted(families):
        try:
            for local, _, remote, remote_port in mptcp_subflows(family):
                if remote_port == port and remote in remotes:
                    counts[local] += 1
        except OSError:
            continue
    return dict(counts)
