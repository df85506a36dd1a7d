"""Local limits: braidd's descriptors, connections per local user, and the accept-error log.

Any local user may connect to the control socket (mode 0666) and to the SOCKS5 port. Without
caps, one user's idle connections would take every descriptor braidd has, and with them root's
own ``braid status`` and, in system-wide mode, every user's network.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import resource
import socket
import struct
import time

log = logging.getLogger(__name__)

#: Descriptors braidd keeps for itself whatever its clients do: netlink, probes, the DNS
#: relay, UDP sessions' sockets, the control socket, logs.
RESERVED_DESCRIPTORS = 1024

#: The control socket. A tray needs one connection, `braid watch` one, each command one.
CONTROL_PER_USER = 16
CONTROL_TOTAL = 128
CONTROL_ROOT_RESERVE = 32  # of the total, kept for root (and braidd's own user)
#: A connection that is not subscribed to events and sends nothing for this long is closed.
CONTROL_IDLE = 30.0

#: Proxied TCP flows (the SOCKS5 port, and redirected ones in system-wide mode): each holds two
#: descriptors (the application's and its tunnel). (The environment variable is for tests that
#: reach the cap.)
SOCKS_PER_USER = int(os.environ.get("BRAID_FLOWS_PER_USER", 1024))
SOCKS_MOST = 16384

#: At most one line a while for each kind of refusal or accept error.
LOG_EVERY = 10.0


def raise_nofile() -> int:
    """Raise the soft limit on open files to the hard limit; the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)
    return soft


def socks_caps() -> ConnectionCaps:
    """Caps for proxied TCP flows that fit the descriptors braidd may open (two per flow)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    flows = min(SOCKS_MOST, max(64, (soft - RESERVED_DESCRIPTORS) // 2))
    return ConnectionCaps(
        "proxied TCP flows",
        per_user=max(1, min(SOCKS_PER_USER, flows // 4)),
        total=flows,
        root_reserve=flows // 4,
    )


class Throttled:
    """Logs one message per key at most every ``every`` seconds, then how many were held back."""

    def __init__(self, logger: logging.Logger, every: float = LOG_EVERY) -> None:
        self._log = logger
        self._every = every
        self._last: dict[object, float] = {}
        self._held: collections.Counter[object] = collections.Counter()

    def __call__(self, key: object, level: int, message: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._every:
            self._held[key] += 1
            return
        if len(self._last) > 1024:  # keys come from callers (uids): keep the table small
            self._last.clear()
            self._held.clear()
        held = self._held.pop(key, 0)
        if held:
            message += f" ({held} more like it in the last {now - last:.0f} s)"
        self._last[key] = now
        self._log.log(level, message, *args)


class ConnectionCaps:
    """Open connections per local user (uid; None when the owner is unknown).

    A new connection is admitted while its user has fewer than ``per_user`` and everyone together
    fewer than ``total - root_reserve``; root (and braidd's own user) only needs the total, so
    it can always reach braidd while others hold all they may.
    """

    def __init__(self, what: str, per_user: int, total: int, root_reserve: int) -> None:
        if not 0 <= root_reserve < total or per_user < 1:
            raise ValueError(f"bad caps for {what}: {per_user}/{total}/{root_reserve}")
        self.what = what
        self.per_user = per_user
        self.total = total
        self.root_reserve = root_reserve
        self._open: collections.Counter[int | None] = collections.Counter()
        self.count = 0
        self.refused = 0
        self._throttled = Throttled(log)

    def _privileged(self, uid: int | None) -> bool:
        return uid is not None and uid in (0, os.geteuid())

    def admit(self, uid: int | None) -> bool:
        """Count a new connection of ``uid`` if it may open one; False (and logged) if not."""
        if self._privileged(uid):
            ok = self.count < self.total
        else:
            ok = self._open[uid] < self.per_user and self.count < self.total - self.root_reserve
        if not ok:
            self.refused += 1
            who = "an unknown user" if uid is None else f"uid {uid}"
            self._throttled(
                uid,
                logging.WARNING,
                "%s: refused a connection of %s: %d open, at most %d per user and %d in all",
                self.what,
                who,
                self._open[uid],
                self.per_user,
                self.total,
            )
            return False
        self._open[uid] += 1
        self.count += 1
        return True

    def release(self, uid: int | None) -> None:
        if self._open[uid] <= 0:
            return
        self._open[uid] -= 1
        if not self._open[uid]:
            del self._open[uid]
        self.count -= 1

    def open_by(self, uid: int | None) -> int:
        return self._open[uid]


# -- who owns the other end of a local TCP connection (sock_diag) -------------------------------

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NLMSG = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid.
_REQ = struct.Struct("=BBBxI")
_SOCKID = struct.Struct("!HH16s16s")  # sport, dport, src, dst (network order)
_SOCKID_TAIL = struct.Struct("=III")  # interface, cookie (two words; all ones: none)
_UID_OFFSET = 4 + _SOCKID.size + _SOCKID_TAIL.size + 12  # in inet_diag_msg


def _packed(family: int, host: str) -> bytes:
    return socket.inet_pton(family, host).ljust(16, b"\0")


class SocketOwners:
    """The uid owning a local TCP socket, asked of the kernel (sock_diag) by its four-tuple.

    One netlink socket, opened on first use; a failure means "unknown", never an exception.
    """

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = 0

    def tcp_owner(self, local: tuple, remote: tuple) -> int | None:
        """The uid of the TCP socket bound to ``local`` and connected to ``remote``."""
        if local[0].startswith("::ffff:") and remote[0].startswith("::ffff:"):
            # A dual-stack listener sees an IPv4 client as mapped; its socket is IPv4.
            local = (local[0].removeprefix("::ffff:"), local[1])
            remote = (remote[0].removeprefix("::ffff:"), remote[1])
        family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
        try:
            body = (
                _REQ.pack(family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF)
                + _SOCKID.pack(
                    local[1], remote[1], _packed(family, local[0]), _packed(family, remote[0])
                )
                + _SOCKID_TAIL.pack(0, 0xFFFFFFFF, 0xFFFFFFFF)
            )
            if self._sock is None:
                self._sock = socket.socket(
                    socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG
                )
                self._sock.settimeout(1.0)
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            header = _NLMSG.pack(_NLMSG.size + len(body), _SOCK_DIAG_BY_FAMILY, 1, self._seq, 0)
            self._sock.send(header + body)
            reply = self._sock.recv(8192)
        except (OSError, ValueError, struct.error):
            self.close()
            return None
        if len(reply) < _NLMSG.size:
            return None
        _, kind, _, _, _ = _NLMSG.unpack_from(reply, 0)
        if kind == _NLMSG_ERROR or len(reply) < _NLMSG.size + _UID_OFFSET + 4:
            return None
        return struct.unpack_from("=I", reply, _NLMSG.size + _UID_OFFSET)[0]

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# -- the event loop's own log of accept errors ----------------------------------------------------

ACCEPT_ERROR = "socket.accept() out of system resource"


def throttle_accept_errors(loop) -> None:
    """asyncio logs every failed accept() of a listener out of descriptors, with a traceback, up
    to its backlog times a second per listener; log one line a while instead."""
    throttled = Throttled(log)

    def handler(loop, context: dict) -> None:
        if context.get("message") == ACCEPT_ERROR:
            sock = context.get("socket")
            where = "?"
            with contextlib.suppress(OSError, AttributeError):
                where = str(sock.getsockname())
            throttled(
                ("accept", where),
                logging.ERROR,
                "cannot accept connections on %s: %s (out of descriptors or memory)",
                where,
                context.get("exception"),
            )
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
