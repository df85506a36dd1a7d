"""A delay line between two interfaces: the "wire" of one test link.

The kernel of the test machine has no netem qdisc, so link delay is made in user space: this
program runs inside a link's middle namespace, opens an AF_PACKET socket on each of its two veths
and copies every Ethernet frame from one to the other after a fixed one-way delay, in both
directions, in order. The two veths' other ends are the laptop's interface and the ISP's `down`
interface, so to both of them the wire looks like a (long) cable.

Design notes:

* One thread per direction. Each thread blocks in ``recvfrom`` with a timeout that ends when the
  oldest queued frame is due, then sends every due frame. This keeps one core's worth of Python
  well above the ~10k frames/s a 100 Mbit/s link needs.
* Frames are queued as ``(release_time, frame)`` in a deque; release times never decrease, even
  when the delay is lowered at run time, so frames are never reordered.
* Frames the kernel reports as PACKET_OUTGOING (our own transmissions, seen again by a socket on
  the same interface) are ignored; PACKET_IGNORE_OUTGOING asks the kernel not to deliver them at
  all where supported.
* Offloads must be off on the veths (the test world does it with ethtool): with GSO/TSO a "frame"
  can be a 64 KiB super-packet that cannot be sent again as one frame, and with TX checksum
  offload the checksum would never be filled in.

Control: with ``--control-stdin`` the program reads commands, one per line, from standard input
and answers one line on standard output:

* ``delay <one-way-ms>``  -> ``ok``        change the delay (both directions)
* ``stats``               -> a JSON object with per-direction counters
* end of input            -> exit (so the forwarder dies with its owner)

Run: ``python -m braid.netbed.wire IFACE_A IFACE_B --delay-ms 20 [--control-stdin]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_OUTGOING = 4
PACKET_IGNORE_OUTGOING = 23
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32

SOCKET_BUFFER = 8 << 20
#: Longest wait in recv when nothing is queued; bounds how long a stop request can take.
IDLE_WAIT = 0.2
#: A frame queue longer than this means something upstream is broken; drop rather than grow.
MAX_QUEUE = 200_000
MAX_FRAME = 65536


@dataclass
class DirectionStats:
    """Counters of one direction, read by the ``stats`` command."""

    frames: int = 0
    bytes: int = 0
    dropped: int = 0
    queued: int = 0


@dataclass
class Delay:
    """The current one-way delay in seconds, shared by both directions."""

    seconds: float = 0.0


def _set_buffer(sock: socket.socket, force_opt: int, opt: int, size: int) -> None:
    # The *FORCE variants ignore net.core.[rw]mem_max (we run as root); fall back if refused.
    try:
        sock.setsockopt(socket.SOL_SOCKET, force_opt, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, opt, size)


def open_packet_socket(ifname: str, *, receive: bool) -> socket.socket:
    """Open an AF_PACKET socket bound to ``ifname``.

    The socket is created with protocol 0 (it receives nothing) and only starts to receive when
    bound with ETH_P_ALL, so it never sees frames of other interfaces. A send-only socket stays
    at protocol 0 and so never queues received frames.
    """
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        if receive:
            _set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, SOCKET_BUFFER)
            with contextlib.suppress(OSError):
                sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            sock.bind((ifname, ETH_P_ALL))
            # veth delivers frames for other MAC addresses to packet sockets anyway; promiscuous
            # mode is asked for in case a future kernel filters them. It ends with the socket.
            mreq = struct.pack("iHH8s", socket.if_nametoindex(ifname), PACKET_MR_PROMISC, 0, b"")
            sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
        else:
            _set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, SOCKET_BUFFER)
            sock.bind((ifname, 0))
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class Direction:
    """Copies frames from ``rx`` to ``tx`` after ``delay``; run by a thread of its own."""

    name: str
    rx: socket.socket
    tx: socket.socket
    delay: Delay
    stop: threading.Event
    stats: DirectionStats = field(default_factory=DirectionStats)

    def run(self) -> None:
        queue: deque[tuple[float, bytes]] = deque()
        rx, stats, delay, stop = self.rx, self.stats, self.delay, self.stop
        monotonic = time.monotonic
        last_release = 0.0
        while not stop.is_set():
            now = monotonic()
            while queue and queue[0][0] <= now:
                self._send(queue.popleft()[1])
            stats.queued = len(queue)
            # Wake up when the oldest frame is due (poll() rounds up to whole milliseconds).
            rx.settimeout(max(queue[0][0] - now, 0.0001) if queue else IDLE_WAIT)
            try:
                frame, addr = rx.recvfrom(MAX_FRAME)
            except TimeoutError:
                continue
            except OSError as exc:
                # ENETDOWN and friends while an interface is down: wait and retry.
                log.debug("%s: recv: %s", self.name, exc)
                stop.wait(0.05)
                continue
            if addr[2] == PACKET_OUTGOING:
                continue
            seconds = delay.seconds
            if seconds <= 0 and not queue:
                self._send(frame)
            elif len(queue) >= MAX_QUEUE:
                stats.dropped += 1
            else:
                last_release = max(monotonic() + seconds, last_release)
                queue.append((last_release, frame))

    def _send(self, frame: bytes) -> None:
        try:
            self.tx.send(frame)
        except OSError:
            # The far interface is down or its queue is full: the frame is lost, as on a cable.
            self.stats.dropped += 1
            return
        self.stats.frames += 1
        self.stats.bytes += len(frame)


class Wire:
    """The two directions between interfaces ``a`` and ``b``."""

    def __init__(self, a: str, b: str, delay_ms: float = 0.0) -> None:
        self.delay = Delay(delay_ms / 1000.0)
        self.stop = threading.Event()
        self._sockets = [
            open_packet_socket(a, receive=True),
            open_packet_socket(b, receive=False),
            open_packet_socket(b, receive=True),
            open_packet_socket(a, receive=False),
        ]
        rx_a, tx_b, rx_b, tx_a = self._sockets
        self.directions = {
            f"{a}>{b}": Direction(f"{a}>{b}", rx_a, tx_b, self.delay, self.stop),
            f"{b}>{a}": Direction(f"{b}>{a}", rx_b, tx_a, self.delay, self.stop),
        }
        self._threads = [
            threading.Thread(target=d.run, name=name, daemon=True)
            for name, d in self.directions.items()
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        self.stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=2 * IDLE_WAIT + 1)
        for sock in self._sockets:
            sock.close()

    def set_delay_ms(self, one_way_ms: float) -> None:
        self.delay.seconds = max(0.0, one_way_ms) / 1000.0

    def stats(self) -> dict[str, object]:
        return {
            "delay_ms": self.delay.seconds * 1000.0,
            **{name: vars(d.stats).copy() for name, d in self.directions.items()},
        }


def _control_loop(wire: Wire) -> None:
    """Serve commands from stdin until end of input."""
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        try:
            if words[0] == "delay" and len(words) == 2:
                wire.set_delay_ms(float(words[1]))
                reply = "ok"
            elif words[0] == "stats":
                reply = json.dumps(wire.stats())
            else:
                reply = "error unknown command"
        except ValueError as exc:
            reply = f"error {exc}"
        print(reply, flush=True)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m braid.netbed.wire",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("a", help="first interface")
    parser.add_argument("b", help="second interface")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay")
    parser.add_argument(
        "--control-stdin",
        action="store_true",
        help="read commands from stdin; exit at end of input",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="wire: %(message)s")

    wire = Wire(args.a, args.b, args.delay_ms)
    wire.start()
    print("ready", flush=True)
    try:
        if args.control_stdin:
            _control_loop(wire)
        else:
            signal.signal(signal.SIGTERM, _exit_on_signal)
            while True:
                signal.pause()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        wire.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
