"""A warm pool of connected, authenticated tunnel connections.

MPTCP handshake, TLS and the token check cost round trips to the server; the
pool pays them ahead of time so a new flow costs only its own request.
Connections are replaced when they age (the server drops idle ones after five
minutes) or when the best link changes, so new flows start their initial
subflow on the best healthy link.

The pool connects to the server's addresses as braidd resolved them when it paired (or
started): it never looks the name up again. In system-wide mode braidd's own lookups would be
captured and need a tunnel, and a tunnel that needs a lookup would then never open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable

from braid.aio import spawn
from braid.protocol.pairing import Pairing
from braid.transport import IDLE_RESTART, restart_congestion_control
from braid.tunnel_client import Tunnel, TunnelError, open_tunnel

log = logging.getLogger(__name__)

POOL_SIZE = 4
MAX_AGE = 120.0
RETRY_MIN = 0.5
RETRY_MAX = 15.0


def is_fatal(exc: TunnelError) -> bool:
    """Retrying cannot help (wrong token or certificate): the user must act."""
    return getattr(exc, "fatal", False)


class TunnelPool:
    """Keeps ``size`` ready tunnels, opened from the address ``source`` picks."""

    def __init__(
        self,
        pairing: Pairing,
        source: Callable[[int], str | None],
        size: int = POOL_SIZE,
        on_change: Callable[[], None] | None = None,
        addresses: list[str] | None = None,
        mark: int | None = None,
    ) -> None:
        self.pairing = pairing
        self.addresses = addresses  # the server's, resolved once (None: look the name up)
        self._mark = mark
        self._source = source
        self._size = size
        self._ready: list[Tunnel] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._families: list[int] = []
        self._on_change = on_change or (lambda: None)
        self.last_error: str | None = None
        self.fatal_error: str | None = None
        self.connected = False  # the last attempt to reach the server succeeded
        self.opened = 0

    async def start(self) -> None:
        self._task = spawn(self._fill(), name="tunnel-pool")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        ready, self._ready = self._ready, []
        await asyncio.gather(*(t.close() for t in ready), return_exceptions=True)

    @property
    def size(self) -> int:
        return self._size

    def resize(self, size: int) -> None:
        """Keep ``size`` tunnels ready from now on (a setting changed)."""
        self._size = size
        surplus, self._ready = self._ready[size:], self._ready[:size]
        for tunnel in surplus:
            spawn(tunnel.close(), name="tunnel-close")
        self._wake.set()

    @property
    def ready_count(self) -> int:
        return len(self._ready)

    async def take(self) -> Tunnel:
        """The oldest ready tunnel bound to the current best link, or a fresh one.

        Oldest first: every pooled tunnel gets used before it ages out (the server's handshake
        is not spent for nothing), and after a pause each of the next flows takes a tunnel that
        waited through it, not one opened a moment before by the refill."""
        now = time.monotonic()
        while self._ready:
            tunnel = self._ready.pop(0)
            if self._usable(tunnel, now):
                self._wake.set()
                if now - tunnel.created >= IDLE_RESTART:
                    # It sat idle since its handshake: its congestion state is stale.
                    restart_congestion_control(tunnel.sock)
                return tunnel
            spawn(tunnel.close(), name="tunnel-close")
        self._wake.set()
        return await self._open()

    def refresh(self) -> None:
        """The links changed: drop tunnels that no longer start on the best link."""
        now = time.monotonic()
        keep = [t for t in self._ready if self._usable(t, now)]
        for tunnel in self._ready:
            if tunnel not in keep:
                spawn(tunnel.close(), name="tunnel-close")
        self._ready = keep
        self._wake.set()

    def _usable(self, tunnel: Tunnel, now: float) -> bool:
        if not tunnel.is_alive() or now - tunnel.created > MAX_AGE:
            return False
        bound = tunnel.local[0]
        family = socket.AF_INET6 if ":" in bound else socket.AF_INET
        return self._source(family) in (None, bound)

    async def _families_to_try(self) -> list[int]:
        if self.addresses is not None:
            found = [socket.AF_INET6 if ":" in a else socket.AF_INET for a in self.addresses]
            return list(dict.fromkeys(found))
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(
                self.pairing.host, self.pairing.port, type=socket.SOCK_STREAM
            )
        except OSError as exc:
            raise TunnelError(
                f"cannot resolve the server name {self.pairing.host}: {exc}"
            ) from None
        families: list[int] = []
        for family, *_ in infos:
            if family not in families:
                families.append(family)
        return families

    async def _open(self) -> Tunnel:
        try:
            families = await self._families_to_try()
        except TunnelError as exc:
            self._set_result(exc)  # a failure is a failure, however early: status says so
            raise
        last: TunnelError | None = None
        for family in families:
            bind = self._source(family)
            try:
                tunnel = await open_tunnel(
                    self.pairing,
                    bind=(bind, 0) if bind else None,
                    timeout=10.0,
                    addresses=self.addresses,
                    mark=self._mark,
                )
            except TunnelError as exc:
                last = exc
                if is_fatal(exc):
                    break
                continue
            self.opened += 1
            self._set_result(None)
            return tunnel
        exc = last or TunnelError("no link can reach the server")
        self._set_result(exc)
        raise exc

    def _set_result(self, exc: TunnelError | None) -> None:
        before = (self.connected, self.last_error, self.fatal_error)
        if exc is None:
            self.connected = True
            self.last_error = None
            self.fatal_error = None
        else:
            self.connected = False
            self.last_error = str(exc)
            if is_fatal(exc):
                self.fatal_error = str(exc)
        if before != (self.connected, self.last_error, self.fatal_error):
            self._on_change()

    async def _fill(self) -> None:
        delay = RETRY_MIN
        while True:
            self.refresh_aged()
            if len(self._ready) >= self._size:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=10)
                continue
            try:
                tunnel = await self._open()
            except TunnelError as exc:
                log.warning("cannot open a tunnel to %s: %s", self.pairing.server, exc)
                if self.fatal_error:
                    # Wrong token or certificate: hammering the server will not fix it.
                    delay = RETRY_MAX
                # Back off, but try again at once when the links change (a link came back,
                # or the server answers probes again after a restart).
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_MIN
            self._ready.append(tunnel)

    def refresh_aged(self) -> None:
        now = time.monotonic()
        if any(not self._usable(t, now) for t in self._ready):
            self.refresh()
