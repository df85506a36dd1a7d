"""Packet capture in a namespace of the test world, with tcpdump (Debian package ``tcpdump``).

:meth:`braid.netbed.world.World.capture` is the way in::

    with world.capture("laptop", "eth0", "udp port 53") as cap:
        ...
    assert cap.count() == 0

tcpdump writes a pcap file in the world's workdir (kept for a look with wireshark) and is bounded
by ``timeout`` and a packet count; :meth:`Capture.packets` reads the file back with
``tcpdump -r -nn -tt`` and parses one dict per packet (:func:`parse_line`). ``iface`` may be
``any``: each packet then says which interface it crossed, and in which direction.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from braid.netbed.nsutil import NetbedError

#: Packets one capture keeps at most (tcpdump ``-c``).
MAX_PACKETS = 100_000
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
#: After the ``with`` block: time for packets already on their way to reach the file.
SETTLE = 0.2

_IPV4_PORT = re.compile(r"^(\d+\.\d+\.\d+\.\d+)\.(\d+)$")
#: ``<time> [<iface> <direction>] <kind> <rest>``; the interface and direction come with ``-i any``.
_LINE = re.compile(r"^(\d+\.\d+) (?:(\S+)\s+(In|Out|B|M|P)\s+)?(\S+) (.*)$")
_ADDRESSES = re.compile(r"^(\S+) > (\S+?):? (.*)$")


def _endpoint(text: str, kind: str) -> tuple[str, int | None]:
    if kind == "IP":
        match = _IPV4_PORT.match(text)
        return (match.group(1), int(match.group(2))) if match else (text, None)
    if kind == "IP6" and "." in text:
        host, _, port = text.rpartition(".")
        if port.isdigit():
            return host, int(port)
    return text, None


def parse_line(line: str, iface: str = "") -> dict[str, Any] | None:
    """One line of ``tcpdump -nn -tt`` as a dict (None for other lines): time, iface (from the
    line with ``-i any``, else ``iface``), direction ("In"/"Out"/"" ...), kind ("IP", "IP6",
    "ARP," ...), src, sport, dst, dport (ports None without: ICMP, ARP), info, line."""
    match = _LINE.match(line)
    if match is None:
        return None
    stamp, name, direction, kind, rest = match.groups()
    packet: dict[str, Any] = {
        "time": float(stamp),
        "iface": name or iface,
        "direction": direction or "",
        "kind": kind,
        "src": "",
        "sport": None,
        "dst": "",
        "dport": None,
        "info": rest,
        "line": line,
    }
    addresses = _ADDRESSES.match(rest) if kind in ("IP", "IP6") else None
    if addresses is not None:
        packet["src"], packet["sport"] = _endpoint(addresses.group(1), kind)
        packet["dst"], packet["dport"] = _endpoint(addresses.group(2), kind)
        packet["info"] = addresses.group(3)
    return packet


class Capture:
    """A running (then finished) tcpdump. ``popen(argv, **kw)`` starts a process in the namespace
    to capture in, ``run(argv)`` runs one there (tcpdump names the interfaces of ``-i any``
    captures by the index in the namespace reading the file)."""

    def __init__(
        self,
        popen: Callable[..., subprocess.Popen[Any]],
        run: Callable[[list[str]], subprocess.CompletedProcess[str]],
        iface: str,
        bpf_filter: str,
        path: Path,
        max_seconds: float,
    ) -> None:
        if shutil.which("tcpdump") is None:
            raise NetbedError("capture needs tcpdump (Debian: apt-get install tcpdump)")
        self.iface = iface
        self.filter = bpf_filter
        self.path = path
        self._run = run
        self._final: list[dict[str, Any]] | None = None
        argv = [
            "timeout",
            "--signal=INT",
            f"{max_seconds:g}",
            "tcpdump",
            "-i",
            iface,
            "-n",
            "-U",
            "--immediate-mode",
            "-Z",
            "root",  # Debian's tcpdump would drop to its own user and could not write the file
            "-c",
            str(MAX_PACKETS),
            "-w",
            str(path),
            *([bpf_filter] if bpf_filter else []),
        ]
        self._proc = popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self._stderr = b""
        self._wait_listening()

    def _read_stderr(self, timeout: float) -> bool:
        """Read what tcpdump said within ``timeout``; False once it closed its stderr."""
        assert self._proc.stderr is not None
        fd = self._proc.stderr.fileno()
        if not select.select([fd], [], [], max(0.0, timeout))[0]:
            return True
        data = os.read(fd, 65536)
        self._stderr += data
        return bool(data)

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while b"listening on" not in self._stderr:
            left = deadline - time.monotonic()
            if left <= 0 or not self._read_stderr(left):
                self.stop(settle=0)
                raise NetbedError(f"tcpdump did not start: {self.messages.strip()}")

    @property
    def messages(self) -> str:
        """What tcpdump wrote on its standard error (its statistics once stopped)."""
        return self._stderr.decode(errors="replace")

    @property
    def running(self) -> bool:
        return self._proc.poll() is None

    def stop(self, settle: float = SETTLE) -> None:
        """Let ``settle`` seconds of packets in, stop tcpdump (SIGINT: it flushes) and read the
        file while the namespace still exists."""
        if self._final is not None:
            return
        if self.running and settle > 0:
            time.sleep(settle)
        if self.running:
            with contextlib.suppress(OSError):
                self._proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and self._read_stderr(deadline - time.monotonic()):
            pass
        try:
            self._proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(1.0)
        if self._proc.stderr is not None:
            self._proc.stderr.close()
        try:
            self._final = self._read()
        except (OSError, subprocess.SubprocessError):
            self._final = []

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        done = self._run(["tcpdump", "-r", str(self.path), "-nn", "-tt"])
        parsed = (parse_line(line, self.iface) for line in done.stdout.splitlines())
        return [packet for packet in parsed if packet is not None]

    def packets(self) -> list[dict[str, Any]]:
        """The packets captured so far (see :func:`parse_line`), also while still running."""
        return list(self._final) if self._final is not None else self._read()

    def count(self) -> int:
        return len(self.packets())
