"""Frees MPTCP connections whose receive buffer filled up with out-of-order data.

Linux 6.18 can stop an MPTCP connection for good: one range of the data stream goes missing on
one subflow while the other subflows deliver what comes after it. That out-of-order data fills the
connection's receive buffer; from then on the kernel leaves the missing range waiting in its
subflow, because the connection's buffer is full, so the range never arrives, nothing becomes
readable, the buffer never drains, and every retransmission of the range is dropped the same way.
(Plain TCP prunes its out-of-order queue in this case; MPTCP does not.) At 500 concurrent downloads
through the test world it happened to one to three connections in most runs.

The signature cannot be mistaken for a slow reader: the receive memory has reached the buffer's
size while not one byte is readable. :class:`StallGuard` looks at every relayed tunnel socket twice
a second; a socket that shows the signature twice in a row gets a larger buffer: the largest that
receive autotuning could have given it (``net.ipv4.tcp_rmem``), at least twice the old one. A
buffer set by hand no longer autotunes, so it must not be left small. The next segment on any
subflow (the peer keeps retransmitting) then moves the missing range in and wakes the reader, and
the connection goes on where it stopped. The guard itself never reads or peeks: data the kernel
pulls in for a read on the guard's behalf would wake nobody.

Past ``net.core.rmem_max`` only a process with CAP_NET_ADMIN can raise a buffer; braidd runs as
root, braid-server does not, so on a server the guard can fail, and says so once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from braid.aio import spawn

log = logging.getLogger(__name__)

SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_MEMINFO = struct.Struct("=2I")  # SK_MEMINFO_RMEM_ALLOC, SK_MEMINFO_RCVBUF: the first two of nine
INTERVAL = 0.5
STRIKES = 2  # sweeps in a row that must see the signature
CAP = 64 << 20
AUTOTUNE_MAX_DEFAULT = 6 << 20  # the kernel's own default for the third field of tcp_rmem


@dataclass
class _Watch:
    sock: socket.socket
    label: str
    strikes: int = 0
    given_up: bool = False


def receive_memory(sock: socket.socket) -> tuple[int, int, bool]:
    """(bytes of receive memory in use, receive buffer size, whether anything is readable now).

    Readability comes from poll(), which only looks. FIONREAD would not do: on an MPTCP socket
    it first pulls waiting data in from the subflows, and data pulled in that way wakes no
    reader, so the event loop would never learn it is there.
    """
    rmem, rcvbuf = _MEMINFO.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 9 * 4)[:8])
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return rmem, rcvbuf, bool(poller.poll(0))


def is_stalled(rmem: int, rcvbuf: int, readable: bool) -> bool:
    """The receive buffer is full and none of it can be read: it holds only out-of-order data."""
    return not readable and rcvbuf > 0 and rmem >= rcvbuf


def autotune_max(path: str = "/proc/sys/net/ipv4/tcp_rmem") -> int:
    """The largest receive buffer autotuning gives a TCP socket in this network namespace."""
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        return AUTOTUNE_MAX_DEFAULT


#: The receive buffer every tunnel socket gets at both ends (see fix_receive_buffer).
TUNNEL_RCVBUF = 16 << 20
#: The net.core.rmem_max an unprivileged server needs: the tunnel buffer, and the guard's
#: doubling of it (the kernel doubles what it is given, so half of twice the buffer).
RMEM_MAX_ADVICE = 2 * TUNNEL_RCVBUF


def rmem_max(path: str = "/proc/sys/net/core/rmem_max") -> int:
    """The largest receive buffer an unprivileged process may ask for (net.core.rmem_max)."""
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0


def fix_receive_buffer(sock: socket.socket | None, want: int = TUNNEL_RCVBUF) -> bool:
    """Give a tunnel socket a ``want``-byte receive buffer instead of autotuning; False (and the
    socket untouched) where this process may not have one that large.

    Linux 6.18 lets an MPTCP sender pass the window the receiver announced while receive
    autotuning is still growing it; the receiver then drops data its subflows have already
    acknowledged, and only MPTCP-level retransmissions, one fragment per timeout, fill the hole:
    the whole connection pauses for 0.35 s or more, several times (docs/ARCHITECTURE.md, "Why a
    bulk transfer sometimes pauses on every link at once"). With the window this large from the
    start the sender never reaches its edge. It is a limit, not an allocation.
    """
    half = want // 2  # the kernel doubles what it is given, for its bookkeeping
    if sock is None:
        return True  # nothing to fix (a transport without a socket)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, half)  # root: past rmem_max
        except PermissionError:
            if rmem_max() < half:
                return False  # a smaller fixed buffer would be worse than autotuning
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, half)
    except OSError:
        pass  # closed meanwhile: nothing to say about this process's rights
    return True


def grow_receive_buffer(sock: socket.socket, want: int) -> int:
    """Ask for a ``want``-byte receive buffer; returns the size the kernel granted."""
    half = want // 2  # the kernel doubles what it is given, for its bookkeeping
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, half)  # root: past net.core.rmem_max
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, half)
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


class StallGuard:
    """Watches relayed tunnel sockets and frees those the kernel has wedged (see the module doc).

    One sweeping task per event loop runs while at least one socket is watched.
    """

    def __init__(self, interval: float = INTERVAL, cap: int = CAP) -> None:
        self.interval = interval
        self.cap = cap
        self.freed = 0  # connections whose buffer was grown, since the process started
        self._autotune_max: int | None = None
        self._warned = False
        self._watched: dict[int, _Watch] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None

    @contextlib.contextmanager
    def watching(self, sock: socket.socket | None, label: str) -> Iterator[None]:
        """Watch ``sock`` (the raw socket under a tunnel stream) for the duration of the block."""
        if sock is None or sock.fileno() < 0:
            yield
            return
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new loop (tests run several): start afresh
            self._loop, self._task = loop, None
            self._watched.clear()
        watch = _Watch(sock, label)
        key = id(watch)
        self._watched[key] = watch
        if self._task is None or self._task.done():
            self._task = spawn(self._run(), name="stall-guard")
        try:
            yield
        finally:
            self._watched.pop(key, None)

    async def _run(self) -> None:
        while self._watched:
            await asyncio.sleep(self.interval)
            self.sweep()

    def sweep(self) -> int:
        """Look at every watched socket once; returns how many were freed."""
        freed = 0
        for watch in list(self._watched.values()):
            if not watch.given_up and self._check(watch):
                freed += 1
        return freed

    def _check(self, watch: _Watch) -> bool:
        try:
            if watch.sock.fileno() < 0:
                return False
            rmem, rcvbuf, readable = receive_memory(watch.sock)
            if not is_stalled(rmem, rcvbuf, readable):
                watch.strikes = 0
                return False
            watch.strikes += 1
            if watch.strikes < STRIKES:
                return False
            if self._autotune_max is None:
                self._autotune_max = autotune_max()
            want = min(max(2 * rcvbuf, self._autotune_max), self.cap)
            granted = grow_receive_buffer(watch.sock, want) if want > rcvbuf else rcvbuf
        except OSError:
            return False  # closed under us, or not a socket the kernel reports on
        watch.strikes = 0
        if granted <= rcvbuf:
            watch.given_up = True
            if not self._warned:
                self._warned = True
                log.warning(
                    "%s: the kernel left the tunnel waiting with %d KiB of out-of-order data in "
                    "a full receive buffer, and this process may not make the buffer larger than "
                    "%d KiB; raise sysctl net.core.rmem_max (to %d, say) so stalled "
                    "connections can be freed",
                    watch.label,
                    rmem >> 10,
                    rcvbuf >> 10,
                    want // 2,
                )
            return False
        self.freed += 1
        log.info(
            "%s: the kernel left the tunnel waiting with %d KiB of out-of-order data in a full "
            "receive buffer; buffer raised from %d to %d KiB",
            watch.label,
            rmem >> 10,
            rcvbuf >> 10,
            granted >> 10,
        )
        return True


GUARD = StallGuard()
