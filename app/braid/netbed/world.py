"""The test world: a laptop with several links, their ISPs, an internet and the user's server.

Everything lives in network namespaces made here and removed on :meth:`World.close` (also from
``atexit`` and on SIGTERM/SIGINT, and by :func:`sweep_stale` after a crash). Nothing is ever
changed in the namespace of the machine running it::

    laptop ── wire-1 ── isp-1 ──┐
       │  ─── wire-2 ── isp-2 ──┼── inet (targets 198.19.0.1, 2001:db8:ff::1) ── server
       └───── wire-3 ── isp-3 ──┘
    laptop-2 ─────────── isp-1, isp-2, isp-3     (only with World(..., laptops=3): no wires)
    laptop-3 ─────────── isp-1, isp-2, isp-3

* ``laptop``: one interface per link (eth0, wlan0, usb0 ...), link i with 198.18.i.2/24 and
  2001:db8:i::2/64, default routes in the main table only (metrics 100, 600, 700 ... as
  NetworkManager sets them). Policy routing is the product's job, not the world's.
* ``wire-i``: the delay line (:mod:`braid.netbed.wire`) between the laptop and its ISP.
* ``isp-i``: a router with ``down`` (198.18.i.1, 2001:db8:i::1) and ``up`` (198.18.1i.2,
  2001:db8:1i::2). Rate: tbf on both egresses. Loss and blackhole: nftables in its forward hook.
  It also drops forwarded packets from the laptop whose source address it would not route back
  through ``down`` (strict reverse-path filter, as real access networks do).
  Each ISP also serves a "router page" on its ``down`` addresses, port 80
  (:mod:`braid.netbed.lan`): a device on the laptop's LAN that must be reached directly, not
  through a tunnel. Link 1's ISP also holds 198.18.1.53, the laptop's configured resolver, where
  DNS is always refused.
* ``inet``: routes everything; hosts the targets on its loopback (this kernel has no dummy
  interfaces), served by :mod:`braid.netbed.target`: HTTP on 80 and 443, UDP echo on 7, a UDP
  responder on 443, and DNS (:mod:`braid.netbed.dns`) on 198.19.0.53 and 2001:db8:ff::53.
* ``server``: 198.18.20.2, 2001:db8:20::2; resolves files.braid.test through its own hosts file,
  other names through the DNS server in ``inet``.
* ``laptop`` resolves through 198.18.1.53 (unanswered) and has only localhost in its hosts file:
  names work there only once something (the product) carries DNS elsewhere.
* ``laptop-k`` (k = 2 .. ``laptops``, default none): more laptops at the same ISPs, for a server
  serving several. The same interface names, metrics, hosts and resolver as ``laptop``; link i
  with 198.18.ki.2/24 and 2001:db8:ki::2/64 (e.g. 198.18.21.2: laptop 2, link 1), a veth straight
  into ``isp-i``, whose end ``downk`` holds 198.18.ki.1 and 2001:db8:ki::1 (and a router page).
  No delay line: :meth:`World.set_delay` and :meth:`World.wire_stats` concern ``laptop`` only.
  Everything else at the ISP applies to every laptop: tbf on each ``downk`` as on ``down``
  (downloads are shaped per laptop; uploads share the ISP's ``up``), the reverse-path filter,
  loss and blackhole. Methods about one laptop's side take ``laptop=k`` (default 1):
  :meth:`World.laptop_addr`, :meth:`World.gateway`, :meth:`World.counters`,
  :meth:`World.link_down`, :meth:`World.link_up`; the role is :meth:`World.laptop_role`.

Logs of the services (JSON lines in the workdir): :meth:`World.access_log`, :meth:`World.dns_log`,
:meth:`World.udp_log`, :meth:`World.lan_log`. :meth:`World.capture` runs tcpdump in a namespace.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import psutil

from braid.netbed import nsutil, traffic
from braid.netbed.capture import Capture
from braid.netbed.nsutil import NetbedError, command, ip_batch

log = logging.getLogger(__name__)

KINDS = ("ethernet", "wifi", "cellular", "other")
#: The name prefix of every namespace of a world: ``brd<owner pid>x<counter>-<role>``.
NAME_PATTERN = re.compile(r"^brd(\d+)x(\d+)-")
NFT_TABLE = "braid_netbed"
#: tbf queue bound. Real access links buffer tens of milliseconds (more on bufferbloated ones);
#: 40 ms keeps the RTT under load realistic while still letting one TCP flow fill a 20-100 Mbit/s
#: link at the RTTs used here.
TBF_LATENCY_MS = 40
#: tbf bucket: about 4 ms of traffic (one timer tick at HZ=250), but at least 8 full frames, so a
#: late timer wake-up does not cost throughput while bursts stay far below the queue's latency.
TBF_BURST_SECONDS = 0.004
TBF_MIN_BURST = 8 * 1514
#: Offloads the veths must not use: segmentation (frames would exceed the MTU in the forwarder and
#: in tbf) and checksum offload (the forwarder would copy frames whose checksum is never filled).
OFFLOADS_OFF = ("rx", "tx", "sg", "tso", "gso", "gro", "lro")
#: External programs the world runs (Debian packages iproute2, nftables, ethtool, procps).
TOOLS = ("ip", "tc", "nft", "ethtool", "sysctl")
READY_TIMEOUT = 15.0
STOP_GRACE = 2.0


@dataclass
class LinkSpec:
    """One of the laptop's links and the access network behind it."""

    name: str  # laptop interface name, e.g. "eth0"
    kind: str  # "ethernet" | "wifi" | "cellular" | "other"
    rate_mbit: float | None = 50  # both directions; None = unshaped
    rtt_ms: float = 0  # added round-trip time; 0 = frames still pass the forwarder, undelayed
    loss: float = 0.0  # fraction 0..1 dropped in each direction


DEFAULT_LINKS: tuple[LinkSpec, ...] = (
    LinkSpec("eth0", "ethernet", 50, 10),
    LinkSpec("wlan0", "wifi", 30, 20),
    LinkSpec("usb0", "cellular", 20, 50),
)


def unavailable_reason() -> str | None:
    """Why a World cannot be built on this machine, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) to build network namespaces"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing programs: {', '.join(missing)} (Debian: iproute2 nftables ethtool procps)"
    return None


def _metric(index: int) -> int:
    """NetworkManager-like route metrics in link order: 100, 600, 700, 800 ..."""
    return 100 if index == 1 else 500 + 100 * (index - 1)


def _package_root() -> Path:
    """The directory holding the ``braid`` package, for children started with ``-m``."""
    return Path(__file__).resolve().parents[2]


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: ours) with the braid package importable by ``python -m``."""
    result = dict(os.environ if env is None else env)
    paths = [str(_package_root())]
    if result.get("PYTHONPATH"):
        paths.append(result["PYTHONPATH"])
    result["PYTHONPATH"] = os.pathsep.join(paths)
    return result


def python_argv(module: str, *args: str) -> list[str]:
    """argv running ``module`` with this interpreter, e.g. ``python_argv("braid.netbed.traffic",
    "download", "198.19.0.1")``."""
    return [sys.executable, "-m", module, *args]


class _Helper:
    """A long-running helper process of the world, driven through a line protocol on stdio.

    Its stdin is a pipe it watches: when we die, the pipe closes and it exits on its own.
    """

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._buffer = b""
        with log_path.open("ab") as stderr:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                bufsize=0,
                env=child_env(),
                start_new_session=True,  # the terminal's ^C is ours to handle
            )

    def readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise NetbedError(f"{self.name}: no answer within {timeout:g} s")
            data = os.read(fd, 65536)
            if not data:
                raise NetbedError(f"{self.name} exited (status {self.proc.poll()})")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        if (line := self.readline(timeout)) != "ready":
            raise NetbedError(f"{self.name}: unexpected {line!r}")

    def request(self, line: str, timeout: float = 5.0) -> str:
        assert self.proc.stdin is not None
        with self._lock:
            try:
                self.proc.stdin.write(line.encode() + b"\n")
            except OSError as exc:
                raise NetbedError(f"{self.name}: {exc}") from exc
            return self.readline(timeout)

    def close_stdin(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()


def _stop_processes(procs: Sequence[subprocess.Popen[Any]], grace: float = STOP_GRACE) -> None:
    """SIGTERM them all, wait up to ``grace`` seconds in total, then SIGKILL the rest."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.terminate()
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(1.0)
    for proc in procs:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def _without_tables(text: str, names: Sequence[str]) -> str:
    """``nft list ruleset`` output without the blocks of the tables named ``names``."""
    if not names:
        return text
    kept, skipping = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith("table ") and line.split()[2] in names:
            skipping = True
        if not skipping:
            kept.append(line)
        elif line.startswith("}"):
            skipping = False
    return "".join(kept)


class World:
    """A running test world; use as a context manager (or ``start()``/``close()``)."""

    server_v4 = "198.18.20.2"
    server_v6 = "2001:db8:20::2"
    target_v4 = "198.19.0.1"
    target_v6 = "2001:db8:ff::1"
    spare_v4 = "198.19.0.2"
    spare_v6 = "2001:db8:ff::2"
    target_name = "files.braid.test"
    #: A name with an AAAA record only (NOERROR without answers for A).
    v6only_name = "v6only.braid.test"
    http_port = 80
    #: Plain HTTP on 443: it stands for HTTPS.
    https_port = 443
    echo_port = 7
    #: UDP 443 answers every datagram with ``quic`` (it stands for HTTP/3).
    quic_port = 443
    dns_v4 = "198.19.0.53"
    dns_v6 = "2001:db8:ff::53"
    dns_port = 53
    #: The laptop's configured resolver, on link 1's LAN: every DNS query to it is refused.
    laptop_resolver = "198.18.1.53"
    router_port = 80

    def __init__(
        self,
        links: Sequence[LinkSpec] = DEFAULT_LINKS,
        workdir: str | Path | None = None,
        keep: bool = False,
        laptops: int = 1,
    ) -> None:
        self.links = [dataclasses.replace(link) for link in links]
        _validate(self.links)
        # Laptop k's LAN on link i is 198.18.ki.0/24: at most nine laptops.
        if not 1 <= laptops <= 9:
            raise ValueError("a world has 1 to 9 laptops")
        self.laptops = laptops
        self.prefix = f"brd{os.getpid()}x{next(_counter)}-"
        self.keep = keep
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path()
        self._lock = threading.RLock()
        self._owner_pid = os.getpid()
        self._started = False
        self._closed = False
        self._procs: list[subprocess.Popen[Any]] = []
        self._wires: dict[int, _Helper] = {}
        self._target: _Helper | None = None
        self._routers: dict[int, _Helper] = {}
        self._captures = itertools.count(1)
        self._ready_at = 0.0  # wall-clock time the world became ready

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._started else "new"
        return f"<World {self.prefix}* {[link.name for link in self.links]} {state}>"

    # --- names ---------------------------------------------------------------------------------

    def roles(self) -> list[str]:
        indices = range(1, len(self.links) + 1)
        return [
            "laptop",
            "server",
            "inet",
            *(f"isp-{i}" for i in indices),
            *(f"wire-{i}" for i in indices),
            *self.laptop_roles()[1:],
        ]

    def laptop_roles(self) -> list[str]:
        """The laptops' roles: ``laptop``, then ``laptop-2``, ``laptop-3`` ... (``laptops=``)."""
        return [self.laptop_role(k) for k in range(1, self.laptops + 1)]

    def laptop_role(self, laptop: int = 1) -> str:
        """The role of laptop number ``laptop`` (1-based): ``laptop``, ``laptop-2`` ..."""
        if not 1 <= laptop <= self.laptops:
            raise KeyError(f"no laptop {laptop} in this world")
        return "laptop" if laptop == 1 else f"laptop-{laptop}"

    def ns(self, role: str) -> str:
        """Full namespace name of ``role``: laptop, laptop-<k>, server, inet, isp-<i>, wire-<i>.

        ``isp-<link name>`` and ``wire-<link name>`` (e.g. ``isp-wlan0``) are accepted too.
        """
        kind, _, which = role.partition("-")
        if kind in ("isp", "wire") and which and not which.isdigit():
            role = f"{kind}-{self.link_index(which)}"
        if role not in self.roles():
            raise KeyError(f"no role {role!r} in this world")
        return self.prefix + role

    def link_index(self, name: str) -> int:
        """1-based index of the link whose laptop interface is ``name``."""
        for index, link in enumerate(self.links, 1):
            if link.name == name:
                return index
        raise KeyError(f"no link named {name!r}")

    def link(self, name: str) -> LinkSpec:
        return self.links[self.link_index(name) - 1]

    def laptop_addr(self, name: str, family: int = 4, laptop: int = 1) -> str:
        """Laptop number ``laptop``'s address on its interface ``name``."""
        net = self._lan(self.link_index(name), laptop)
        return f"198.18.{net}.2" if family == 4 else f"2001:db8:{net}::2"

    def gateway(self, name: str, family: int = 4, laptop: int = 1) -> str:
        """The ISP's address on laptop number ``laptop``'s access line of link ``name``."""
        net = self._lan(self.link_index(name), laptop)
        return f"198.18.{net}.1" if family == 4 else f"2001:db8:{net}::1"

    def _lan(self, i: int, laptop: int) -> str:
        """Third octet (and IPv6 group) of laptop ``laptop``'s LAN on link i: ``i`` for the first
        laptop, ``ki`` for laptop k (198.18.21.0/24 and 2001:db8:21::/64: laptop 2, link 1)."""
        self.laptop_role(laptop)  # KeyError for a laptop not in this world
        return str(i) if laptop == 1 else f"{laptop}{i}"

    @staticmethod
    def _access_dev(laptop: int) -> str:
        """The ISP's end of laptop number ``laptop``'s access line: ``down``, ``down2`` ..."""
        return "down" if laptop == 1 else f"down{laptop}"

    def _access_devs(self) -> list[str]:
        return [self._access_dev(k) for k in range(1, self.laptops + 1)]

    def metric(self, name: str) -> int:
        return _metric(self.link_index(name))

    # --- life cycle ----------------------------------------------------------------------------

    def __enter__(self) -> World:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> World:
        """Build the world and wait until every path carries traffic."""
        with self._lock:
            if self._started:
                raise NetbedError("a World can be started only once")
            self._started = True
            self._owner_pid = os.getpid()
            sweep_stale()
            _register(self)
            if self._own_workdir:
                self.workdir = Path(tempfile.mkdtemp(prefix=self.prefix))
            else:
                self.workdir.mkdir(parents=True, exist_ok=True)
            try:
                began = time.monotonic()
                self._build()
                log.info(
                    "world %s ready in %.2f s (workdir %s)",
                    self.prefix,
                    time.monotonic() - began,
                    self.workdir,
                )
            except BaseException:
                self.close()
                raise
        return self

    def close(self) -> None:
        """Stop every process and remove every namespace of this world. Idempotent; never raises.

        Namespaces are found by name prefix, so a world that failed half-way is removed too.
        In a forked child (multiprocessing, pyroute2's netns helpers) this does nothing: the
        world belongs to the process that started it.
        """
        if os.getpid() != self._owner_pid:
            return
        with self._lock, _teardown_guard():
            if self._closed:
                return
            self._closed = True
            try:
                helpers = [
                    *self._wires.values(),
                    *self._routers.values(),
                    *([self._target] if self._target else []),
                ]
                for helper in helpers:
                    helper.close_stdin()
                _stop_processes(self._procs + [h.proc for h in helpers])
            except Exception:
                log.exception("stopping the processes of %s", self.prefix)
            names = {self.prefix + role for role in self.roles()}
            names.update(n for n in nsutil.list_netns() if n.startswith(self.prefix))
            for name in sorted(names):
                try:
                    nsutil.delete_netns(name)
                except Exception:
                    log.exception("deleting namespace %s", name)
            if self._own_workdir and not self.keep and self.workdir != Path():
                shutil.rmtree(self.workdir, ignore_errors=True)
            _unregister(self)
            log.debug("world %s removed", self.prefix)

    # --- building ------------------------------------------------------------------------------

    def _build(self) -> None:
        for role in self.roles():
            command(["ip", "netns", "add", self.ns(role)])
        self._write_etc()

        common = ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]
        router = [
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ]
        # The wires are layer 2 only: without IPv6 their veths send no solicitations of their own.
        wire = ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
        for role in self.roles():
            extra = router if role == "inet" or role.startswith("isp-") else []
            extra = wire if role.startswith("wire-") else extra
            self._sysctl(role, [*common, *extra])

        laptop, inet, server = self.ns("laptop"), self.ns("inet"), self.ns("server")
        for i, link in enumerate(self.links, 1):
            wire_ns, isp = self.ns(f"wire-{i}"), self.ns(f"isp-{i}")
            self._veth(laptop, link.name, "lap", wire_ns)
            self._veth(isp, "down", "isp", wire_ns)
            self._veth(isp, "up", f"isp{i}", inet)
            for k in range(2, self.laptops + 1):
                self._veth(self.ns(self.laptop_role(k)), link.name, self._access_dev(k), isp)
        self._veth(inet, "srv", "eth0", server)

        self._offloads_off("laptop", [link.name for link in self.links])
        self._offloads_off("server", ["eth0"])
        self._offloads_off("inet", ["srv", *(f"isp{i}" for i in range(1, len(self.links) + 1))])
        for i in range(1, len(self.links) + 1):
            self._offloads_off(f"wire-{i}", ["lap", "isp"])
            self._offloads_off(f"isp-{i}", [*self._access_devs(), "up"])
        for role in self.laptop_roles()[1:]:
            self._offloads_off(role, [link.name for link in self.links])

        self._configure_laptop()
        self._configure_isps()
        self._configure_inet_and_server()
        for i, link in enumerate(self.links, 1):
            self._nft(i, self._nft_ruleset())
            self._apply_rate(i, link.rate_mbit)
            self._apply_loss(i, link.loss)

        for i, link in enumerate(self.links, 1):
            self._wires[i] = _Helper(
                f"wire-{i}",
                [
                    "ip",
                    "netns",
                    "exec",
                    self.ns(f"wire-{i}"),
                    *python_argv(
                        "braid.netbed.wire",
                        "lap",
                        "isp",
                        "--delay-ms",
                        f"{link.rtt_ms / 2:g}",
                        "--control-stdin",
                    ),
                ],
                self.workdir / f"wire-{i}.log",
            )
        self._target = _Helper(
            "target",
            [
                "ip",
                "netns",
                "exec",
                inet,
                *python_argv(
                    "braid.netbed.target",
                    "--port",
                    str(self.http_port),
                    "--echo-port",
                    str(self.echo_port),
                    "--extra-port",
                    str(self.https_port),
                    "--quic-port",
                    str(self.quic_port),
                    "--log",
                    str(self.access_log_path),
                    "--udp-log",
                    str(self.udp_log_path),
                    "--dns",
                    self.dns_v4,
                    "--dns",
                    self.dns_v6,
                    "--dns-port",
                    str(self.dns_port),
                    "--dns-log",
                    str(self.dns_log_path),
                    "--target-v4",
                    self.target_v4,
                    "--target-v6",
                    self.target_v6,
                    "--stdin-lifeline",
                ),
            ],
            self.workdir / "target.log",
        )
        for i in range(1, len(self.links) + 1):
            self._routers[i] = _Helper(
                f"router-{i}",
                [
                    "ip",
                    "netns",
                    "exec",
                    self.ns(f"isp-{i}"),
                    *python_argv(
                        "braid.netbed.lan",
                        *itertools.chain.from_iterable(
                            ("--listen", f"198.18.{net}.1", "--listen", f"2001:db8:{net}::1")
                            for net in (self._lan(i, k) for k in range(1, self.laptops + 1))
                        ),
                        "--port",
                        str(self.router_port),
                        "--text",
                        self.router_text(self.links[i - 1].name),
                        "--log",
                        str(self._lan_log_path(i)),
                        "--stdin-lifeline",
                    ),
                ],
                self.workdir / f"router-{i}.log",
            )
        for helper in [*self._wires.values(), self._target, *self._routers.values()]:
            helper.wait_ready()
        self._wait_reachable()
        self._ready_at = time.time()

    @staticmethod
    def _veth(ns: str, dev: str, peer: str, peer_ns: str) -> None:
        """A veth pair: ``dev`` in namespace ``ns``, its other end ``peer`` in ``peer_ns``."""
        command(
            [
                "ip",
                "-n",
                ns,
                "link",
                "add",
                "dev",
                dev,
                "type",
                "veth",
                "peer",
                "name",
                peer,
                "netns",
                peer_ns,
            ]
        )

    def _sysctl(self, role: str, settings: Sequence[str]) -> None:
        command(["ip", "netns", "exec", self.ns(role), "sysctl", "-q", "-w", *settings])

    def _offloads_off(self, role: str, devices: Sequence[str]) -> None:
        for device in devices:
            command(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.ns(role),
                    "ethtool",
                    "-K",
                    device,
                    *itertools.chain.from_iterable((f, "off") for f in OFFLOADS_OFF),
                ]
            )

    def _laptop_link_lines(self, i: int, link: LinkSpec, laptop: int = 1) -> list[str]:
        """What NetworkManager would configure on link i (idempotent: ``replace``)."""
        dev, metric, net = link.name, _metric(i), self._lan(i, laptop)
        return [
            f"link set dev {dev} up",
            f"address replace 198.18.{net}.2/24 dev {dev}",
            f"address replace 2001:db8:{net}::2/64 dev {dev} nodad",
            f"route replace default via 198.18.{net}.1 dev {dev} metric {metric}",
            f"route replace ::/0 via 2001:db8:{net}::1 dev {dev} metric {metric}",
        ]

    def _configure_laptop(self) -> None:
        for k, role in enumerate(self.laptop_roles(), 1):
            lines = ["link set dev lo up"]
            for i, link in enumerate(self.links, 1):
                lines += self._laptop_link_lines(i, link, k)
            ip_batch(self.ns(role), lines)
        for i in range(1, len(self.links) + 1):
            ip_batch(
                self.ns(f"wire-{i}"),
                ["link set dev lo up", "link set dev lap up", "link set dev isp up"],
            )

    def _configure_isps(self) -> None:
        for i in range(1, len(self.links) + 1):
            ip_batch(
                self.ns(f"isp-{i}"),
                [
                    "link set dev lo up",
                    "link set dev down up",
                    "link set dev up up",
                    f"address add 198.18.{i}.1/24 dev down",
                    f"address add 2001:db8:{i}::1/64 dev down nodad",
                    f"address add 198.18.{10 + i}.2/24 dev up",
                    f"address add 2001:db8:1{i}::2/64 dev up nodad",
                    f"route add default via 198.18.{10 + i}.1 dev up",
                    f"route add ::/0 via 2001:db8:1{i}::1 dev up",
                    *([f"address add {self.laptop_resolver}/32 dev down"] if i == 1 else []),
                    *itertools.chain.from_iterable(
                        (
                            f"link set dev {self._access_dev(k)} up",
                            f"address add 198.18.{self._lan(i, k)}.1/24 dev {self._access_dev(k)}",
                            f"address add 2001:db8:{self._lan(i, k)}::1/64 "
                            f"dev {self._access_dev(k)} nodad",
                        )
                        for k in range(2, self.laptops + 1)
                    ),
                ],
            )

    def _configure_inet_and_server(self) -> None:
        lines = [
            "link set dev lo up",
            f"address add {self.target_v4}/32 dev lo",
            f"address add {self.spare_v4}/32 dev lo",
            f"address add {self.target_v6}/128 dev lo",
            f"address add {self.spare_v6}/128 dev lo",
            f"address add {self.dns_v4}/32 dev lo",
            f"address add {self.dns_v6}/128 dev lo",
            "link set dev srv up",
            "address add 198.18.20.1/24 dev srv",
            "address add 2001:db8:20::1/64 dev srv nodad",
        ]
        for i in range(1, len(self.links) + 1):
            lines += [
                f"link set dev isp{i} up",
                f"address add 198.18.{10 + i}.1/24 dev isp{i}",
                f"address add 2001:db8:1{i}::1/64 dev isp{i} nodad",
                f"route add 198.18.{i}.0/24 via 198.18.{10 + i}.2 dev isp{i}",
                f"route add 2001:db8:{i}::/64 via 2001:db8:1{i}::2 dev isp{i}",
            ]
            for k in range(2, self.laptops + 1):
                net = self._lan(i, k)
                lines += [
                    f"route add 198.18.{net}.0/24 via 198.18.{10 + i}.2 dev isp{i}",
                    f"route add 2001:db8:{net}::/64 via 2001:db8:1{i}::2 dev isp{i}",
                ]
        ip_batch(self.ns("inet"), lines)
        ip_batch(
            self.ns("server"),
            [
                "link set dev lo up",
                "link set dev eth0 up",
                f"address add {self.server_v4}/24 dev eth0",
                f"address add {self.server_v6}/64 dev eth0 nodad",
                "route add default via 198.18.20.1 dev eth0",
                "route add ::/0 via 2001:db8:20::1 dev eth0",
            ],
        )

    def _write_etc(self) -> None:
        """hosts and resolv.conf of the server and the laptops, which ``ip netns exec`` mounts
        over /etc for processes started in their namespaces (removed with the namespaces)."""
        localhost = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        server_hosts = (
            f"{self.target_v4}\t{self.target_name}\n{self.target_v6}\t{self.target_name}\n"
        )
        for role, hosts, resolver in (
            ("server", localhost + server_hosts, self.dns_v4),
            *((role, localhost, self.laptop_resolver) for role in self.laptop_roles()),
        ):
            directory = nsutil.NETNS_ETC_DIR / self.ns(role)
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "hosts").write_text(hosts)
            # Bind-mounting needs the target file to exist; skip it on a machine without one.
            if Path("/etc/resolv.conf").exists():
                (directory / "resolv.conf").write_text(
                    f"nameserver {resolver}\noptions timeout:1\n"
                )

    def _wait_reachable(self) -> None:
        """Wait until the targets answer UDP echo through every link of every laptop (v4 and v6)
        and from the server. Addresses are added without DAD, so this mostly waits for neighbour
        discovery."""
        checks: list[tuple[str, str | None]] = []
        for role in self.laptop_roles():
            for link in self.links:
                checks += [(role, link.name)]
        checks += [("server", None)]
        deadline = time.monotonic() + READY_TIMEOUT
        for role, device in checks:
            for target in (self.target_v4, self.target_v6):
                while True:
                    with self.enter(role):
                        result = traffic.echo(
                            target, self.echo_port, count=1, timeout=0.5, device=device
                        )
                    if result.received:
                        break
                    if time.monotonic() > deadline:
                        raise NetbedError(f"{target} unreachable from {role} via {device}")

    # --- running things ------------------------------------------------------------------------

    @contextlib.contextmanager
    def enter(self, role: str) -> Iterator[None]:
        """Run the ``with`` block's socket calls of the calling thread inside ``role``'s
        namespace (see :func:`braid.netbed.nsutil.entered`)."""
        with nsutil.entered(self.ns(role)):
            yield

    def _argv(self, role: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(role), *argv]

    def run(self, role: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` inside ``role``'s namespace. Defaults: check=True and, unless
        stdout/stderr are given, captured text output. The braid package is importable."""
        kw.setdefault("check", True)
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw["env"] = child_env(kw.get("env"))
        full = self._argv(role, argv)
        log.debug("run in %s: %s", role, " ".join(argv))
        return subprocess.run(full, **kw)

    def popen(self, role: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` inside ``role``'s namespace; stopped (SIGTERM, then SIGKILL) by
        :meth:`close` if still running."""
        kw["env"] = child_env(kw.get("env"))
        with self._lock:
            if self._closed or not self._started:
                raise NetbedError("world is not running")
            log.debug("popen in %s: %s", role, " ".join(argv))
            proc = subprocess.Popen(self._argv(role, argv), **kw)
            self._procs.append(proc)
        return proc

    # --- link conditions -----------------------------------------------------------------------

    def _nft_ruleset(self) -> str:
        devs = self._access_devs()
        access = (
            f'"{devs[0]}"' if len(devs) == 1 else "{ " + ", ".join(f'"{d}"' for d in devs) + " }"
        )
        return f"""
table inet {NFT_TABLE} {{
    chain forward {{
        type filter hook forward priority filter; policy accept;
        jump blackhole
        iifname {access} fib saddr . iif oif missing counter drop
        jump loss
    }}
    chain blackhole {{
    }}
    chain loss {{
    }}
    counter dead_resolver {{
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        ip daddr {self.laptop_resolver} udp dport 53 counter name dead_resolver reject
        ip daddr {self.laptop_resolver} tcp dport 53 counter name dead_resolver reject with tcp reset
    }}
}}
"""

    def _nft(self, i: int, script: str) -> None:
        command(["ip", "netns", "exec", self.ns(f"isp-{i}"), "nft", "-f", "-"], input=script)

    def blackhole(self, name: str) -> None:
        """The ISP of link ``name`` silently stops forwarding, both ways; the link stays up.

        The ISP is every laptop's: all of them lose link ``name`` (as do :meth:`set_loss` and
        :meth:`set_rate`, which shape every laptop's access line)."""
        i = self.link_index(name)
        self._nft(
            i,
            f"flush chain inet {NFT_TABLE} blackhole\n"
            f"add rule inet {NFT_TABLE} blackhole counter drop\n",
        )
        log.info("blackholed %s", name)

    def drop_udp(self, name: str, larger_than: int | None = None) -> None:
        """The ISP of link ``name`` drops UDP datagrams, both ways (TCP still passes), as some
        networks do: all of them, or those whose UDP length (header included) is larger than
        ``larger_than``. :meth:`restore` undoes it."""
        i = self.link_index(name)
        size = "" if larger_than is None else f"udp length > {int(larger_than)} "
        self._nft(
            i,
            f"flush chain inet {NFT_TABLE} blackhole\n"
            f"add rule inet {NFT_TABLE} blackhole meta l4proto udp {size}counter drop\n",
        )
        log.info("dropping UDP%s on %s", f" over {larger_than} bytes" if size else "", name)

    def strip_mptcp(self, name: str) -> None:
        """The ISP of link ``name`` strips the MPTCP option from every TCP segment, both ways
        (it becomes padding), as some middleboxes do: MPTCP through it falls back to plain TCP
        and joins fail. :meth:`restore` undoes it."""
        self._nft(
            self.link_index(name),
            f"flush chain inet {NFT_TABLE} blackhole\n"
            f"add rule inet {NFT_TABLE} blackhole tcp option mptcp exists counter "
            "reset tcp option mptcp\n",
        )
        log.info("stripping the MPTCP option on %s", name)

    def restore(self, name: str) -> None:
        """Undo :meth:`blackhole`, :meth:`drop_udp` and :meth:`strip_mptcp`."""
        self._nft(self.link_index(name), f"flush chain inet {NFT_TABLE} blackhole\n")
        log.info("restored %s", name)

    def link_down(self, name: str, laptop: int = 1) -> None:
        """Take the laptop's interface down (the kernel flushes its routes and IPv6 addresses)."""
        role = self.laptop_role(laptop)
        command(["ip", "-n", self.ns(role), "link", "set", "dev", name, "down"])
        log.info("link %s down%s", name, "" if laptop == 1 else f" on {role}")

    def link_up(self, name: str, laptop: int = 1) -> None:
        """Bring the interface back with its addresses and main-table default routes, as
        NetworkManager would on reconnect."""
        i = self.link_index(name)
        role = self.laptop_role(laptop)
        ip_batch(self.ns(role), self._laptop_link_lines(i, self.links[i - 1], laptop))
        log.info("link %s up%s", name, "" if laptop == 1 else f" on {role}")

    def set_rate(self, name: str, mbit: float | None) -> None:
        """Shape link ``name`` to ``mbit`` in each direction (None: unshaped).

        Downloads are shaped on each laptop's access line, uploads on the ISP's uplink, which
        the laptops of a world with ``laptops > 1`` share."""
        i = self.link_index(name)
        self._apply_rate(i, mbit)
        self.links[i - 1].rate_mbit = mbit

    def _apply_rate(self, i: int, mbit: float | None) -> None:
        isp = self.ns(f"isp-{i}")
        # down (down2 ...): download direction of each laptop, up: upload direction
        for device in (*self._access_devs(), "up"):
            if mbit is None:
                command(["tc", "-n", isp, "qdisc", "del", "dev", device, "root"], check=False)
                continue
            if mbit <= 0:
                raise ValueError("rate must be positive (or None for unshaped)")
            rate_bytes = mbit * 1e6 / 8
            burst = max(TBF_MIN_BURST, int(rate_bytes * TBF_BURST_SECONDS))
            command(
                [
                    "tc",
                    "-n",
                    isp,
                    "qdisc",
                    "replace",
                    "dev",
                    device,
                    "root",
                    "tbf",
                    "rate",
                    f"{int(mbit * 1e6)}bit",
                    "burst",
                    str(burst),
                    "latency",
                    f"{TBF_LATENCY_MS}ms",
                ]
            )

    def set_delay(self, name: str, rtt_ms: float) -> None:
        """Change the round-trip time added by link ``name``'s wire (half each way)."""
        if rtt_ms < 0:
            raise ValueError("negative delay")
        i = self.link_index(name)
        reply = self._wires[i].request(f"delay {rtt_ms / 2:g}")
        if reply != "ok":
            raise NetbedError(f"wire-{i}: {reply}")
        self.links[i - 1].rtt_ms = rtt_ms

    def set_loss(self, name: str, fraction: float) -> None:
        """Drop ``fraction`` of the packets at link ``name``'s ISP, independently in each
        direction (a round trip then fails with probability 1 - (1 - fraction)**2)."""
        i = self.link_index(name)
        self._apply_loss(i, fraction)
        self.links[i - 1].loss = fraction

    def _apply_loss(self, i: int, fraction: float) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError("loss must be within 0..1")
        script = f"flush chain inet {NFT_TABLE} loss\n"
        threshold = round(fraction * 10000)
        if threshold >= 10000:  # nft refuses "mod 10000 < 10000": the value is out of range
            script += f"add rule inet {NFT_TABLE} loss counter drop\n"
        elif threshold:
            script += (
                f"add rule inet {NFT_TABLE} loss "
                f"numgen random mod 10000 < {threshold} counter drop\n"
            )
        self._nft(i, script)

    # --- observation ---------------------------------------------------------------------------

    def network_state(self, role: str = "laptop", skip_tables: Sequence[str] = ()) -> str:
        """Everything a daemon may change in a namespace, as text to compare before and after:
        rules, every routing table, MPTCP endpoints, limits and path manager, and the nftables
        ruleset (without the tables named in ``skip_tables``, e.g. one whose counters move while
        a daemon runs)."""
        return "\n".join(
            _without_tables(
                self.run(role, argv, capture_output=True, text=True).stdout, skip_tables
            )
            for argv in (
                ["ip", "-4", "rule"],
                ["ip", "-6", "rule"],
                ["ip", "-4", "route", "show", "table", "all"],
                ["ip", "-6", "route", "show", "table", "all"],
                ["ip", "mptcp", "endpoint"],
                ["ip", "mptcp", "limits"],
                ["sysctl", "-n", "net.mptcp.path_manager"],
                ["nft", "list", "ruleset"],
            )
        )

    def counters(self, name: str, laptop: int = 1) -> tuple[int, int]:
        """(rx_bytes, tx_bytes) of laptop number ``laptop``'s interface ``name``, from netlink."""
        from pyroute2 import IPRoute

        # Entering the namespace ourselves: IPRoute(netns=...) forks a helper process.
        with self.enter(self.laptop_role(laptop)), IPRoute() as ipr:
            link = ipr.link("get", ifname=name)[0]
        stats = link.get("stats64") or link.get("stats")
        return int(stats["rx_bytes"]), int(stats["tx_bytes"])

    def wire_stats(self, name: str) -> dict[str, Any]:
        """Counters of link ``name``'s forwarder (frames, bytes, drops, queue per direction)."""
        reply: dict[str, Any] = json.loads(self._wires[self.link_index(name)].request("stats"))
        return reply

    @property
    def access_log_path(self) -> Path:
        return self.workdir / "access.log"

    def access_log(self) -> list[dict[str, Any]]:
        """The target's HTTP access log so far (ports 80 and 443), one dict per request."""
        return _read_json_lines(self.access_log_path)

    def wait_access(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = 5.0
    ) -> dict[str, Any]:
        """The latest access-log entry satisfying ``match``, waiting for it up to ``timeout``.

        The target writes an entry after the last byte went out, so a client that has just
        finished can be ahead of the log.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = [entry for entry in self.access_log() if match(entry)]
            if found:
                return found[-1]
            if time.monotonic() > deadline:
                raise NetbedError(f"no matching access-log entry within {timeout:g} s")
            time.sleep(0.02)

    @property
    def udp_log_path(self) -> Path:
        return self.workdir / "udp.log"

    @property
    def dns_log_path(self) -> Path:
        return self.workdir / "dns.log"

    def _lan_log_path(self, i: int) -> Path:
        return self.workdir / f"lan-{i}.log"

    def dns_log(self) -> list[dict[str, Any]]:
        """Every query the DNS server got: time, client, port, server (the address asked),
        transport ("udp"/"tcp"), qname, qtype ("A", "AAAA", "TYPE65" ...), rcode, answers.
        Written before the answer leaves."""
        return _read_json_lines(self.dns_log_path)

    def udp_log(self, service: str | None = None) -> list[dict[str, Any]]:
        """Every datagram of the target's UDP services: time, client, port (the client's),
        service ("echo" or "quic"), server_port, bytes. Written before the reply leaves.

        The echoes the world sent itself while starting are left out.
        """
        return [
            e
            for e in _read_json_lines(self.udp_log_path)
            if e["time"] >= self._ready_at and (service is None or e["service"] == service)
        ]

    def lan_log(self) -> list[dict[str, Any]]:
        """Requests to the router pages, by time: time, link (the laptop interface's name),
        client, port, server, method, path, status. Written before the answer leaves."""
        entries = []
        for i, link in enumerate(self.links, 1):
            entries += [{**e, "link": link.name} for e in _read_json_lines(self._lan_log_path(i))]
        return sorted(entries, key=lambda e: float(e["time"]))

    def router_text(self, name: str) -> str:
        """What link ``name``'s router page (``http://<gateway>/``) answers, without newline."""
        return f"router {self.link_index(name)}"

    def dead_resolver_hits(self) -> int:
        """DNS packets that reached the laptop's configured resolver (all refused)."""
        done = command(
            [
                "ip",
                "netns",
                "exec",
                self.ns("isp-1"),
                "nft",
                "-j",
                "list",
                "counter",
                "inet",
                NFT_TABLE,
                "dead_resolver",
            ]
        )
        for item in json.loads(done.stdout)["nftables"]:
            if "counter" in item:
                return int(item["counter"]["packets"])
        raise NetbedError("no dead_resolver counter")

    @contextlib.contextmanager
    def capture(
        self, role: str, iface: str, bpf_filter: str = "", max_seconds: float = 60.0
    ) -> Iterator[Capture]:
        """tcpdump on ``iface`` of ``role`` for the ``with`` block (at most ``max_seconds``)::

        with world.capture("laptop", "eth0", "udp port 53") as cap:
            ...
        cap.packets()  # parsed summaries; cap.count(), cap.path (the pcap file)
        """
        number = next(self._captures)
        path = self.workdir / f"capture-{number}-{role}-{iface}.pcap"
        self.ns(role)  # KeyError for a role not in this world

        def popen(argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
            return self.popen(role, argv, **kw)

        def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
            return self.run(role, argv, check=False, timeout=30)

        cap = Capture(popen, run, iface, bpf_filter, path, max_seconds)
        try:
            yield cap
        finally:
            cap.stop()

    def summary(self) -> dict[str, Any]:
        """A description of the world for humans and ``braid demo``."""
        return {
            "namespaces": {role: self.ns(role) for role in self.roles()},
            "links": [
                {
                    **dataclasses.asdict(link),
                    "index": i,
                    "metric": _metric(i),
                    "v4": self.laptop_addr(link.name, 4),
                    "v6": self.laptop_addr(link.name, 6),
                    "gateway_v4": self.gateway(link.name, 4),
                    "gateway_v6": self.gateway(link.name, 6),
                }
                for i, link in enumerate(self.links, 1)
            ],
            "server": [self.server_v4, self.server_v6],
            "targets": [self.target_v4, self.target_v6],
            "target_name": self.target_name,
            "dns": [self.dns_v4, self.dns_v6],
            "laptop_resolver": self.laptop_resolver,
            "workdir": str(self.workdir),
            **({"laptops": self._laptops_summary()} if self.laptops > 1 else {}),
        }

    def _laptops_summary(self) -> list[dict[str, Any]]:
        return [
            {
                "role": role,
                "namespace": self.ns(role),
                "links": [
                    {
                        "name": link.name,
                        "v4": self.laptop_addr(link.name, 4, k),
                        "v6": self.laptop_addr(link.name, 6, k),
                        "gateway_v4": self.gateway(link.name, 4, k),
                        "gateway_v6": self.gateway(link.name, 6, k),
                    }
                    for link in self.links
                ],
            }
            for k, role in enumerate(self.laptop_roles(), 1)
        ]


def _read_json_lines(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    # A line being written right now may be incomplete: only whole lines count.
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def _validate(links: Sequence[LinkSpec]) -> None:
    # Link i's ISP uplink is 198.18.(10+i).0/24 and 2001:db8:1i::/64: at most nine links.
    if not 1 <= len(links) <= 9:
        raise ValueError("a world has 1 to 9 links")
    names = [link.name for link in links]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate link names: {names}")
    for link in links:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.]{0,14}", link.name) or link.name == "lo":
            raise ValueError(f"bad interface name {link.name!r}")
        if link.kind not in KINDS:
            raise ValueError(f"link {link.name}: kind must be one of {KINDS}")
        if link.rate_mbit is not None and link.rate_mbit <= 0:
            raise ValueError(f"link {link.name}: rate must be positive or None")
        if link.rtt_ms < 0 or not 0.0 <= link.loss <= 1.0:
            raise ValueError(f"link {link.name}: bad delay or loss")


# --- cleanup: registry, signals, stale worlds ---------------------------------------------------

_counter = itertools.count()
_live: set[World] = set()
_live_lock = threading.Lock()
_install_lock = threading.Lock()
_installed = False
_previous_handlers: dict[int, Any] = {}
_teardown_depth = 0
_pending_signals: list[int] = []


def _register(world: World) -> None:
    _install_handlers()
    with _live_lock:
        _live.add(world)


def _unregister(world: World) -> None:
    with _live_lock:
        _live.discard(world)


def close_all() -> None:
    """Close every world of this process (atexit and signal handlers call this)."""
    with _live_lock:
        worlds = list(_live)
    for world in worlds:
        world.close()


@contextlib.contextmanager
def _teardown_guard() -> Iterator[None]:
    """Defer SIGINT/SIGTERM that arrive during a teardown until it has finished, so that a second
    ^C cannot leave half a world behind."""
    global _teardown_depth
    _teardown_depth += 1
    try:
        yield
    finally:
        _teardown_depth -= 1
        if _teardown_depth == 0 and _pending_signals:
            signum = _pending_signals.pop(0)
            _pending_signals.clear()
            _on_signal(signum, None)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _teardown_depth > 0:
        _pending_signals.append(signum)
        return
    log.info("signal %d: removing the test worlds", signum)
    close_all()
    _chain(signum, frame)


def _chain(signum: int, frame: FrameType | None) -> None:
    """Do what the handler we replaced would have done."""
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:  # SIG_DFL (or None: set outside Python): die of it
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    global _installed
    with _install_lock:
        if _installed:
            return
        _installed = True
        atexit.register(close_all)
        if threading.current_thread() is not threading.main_thread():
            log.debug("not in the main thread: no signal handlers, atexit only")
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            _previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, _on_signal)


def _forget_worlds_after_fork() -> None:
    """A forked child (multiprocessing, pyroute2's netns helpers) inherits our registry, atexit
    and signal handlers; the parent's worlds are not its to remove when it exits or is killed."""
    global _live_lock, _teardown_depth
    _live.clear()
    _live_lock = threading.Lock()
    _teardown_depth = 0
    _pending_signals.clear()


os.register_at_fork(after_in_child=_forget_worlds_after_fork)


def _owner_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


def sweep_stale() -> list[str]:
    """Remove namespaces (with their processes) and /etc/netns directories of worlds whose owner
    process is gone. Returns the names removed."""
    removed = []
    names = set(nsutil.list_netns())
    with contextlib.suppress(OSError):
        names.update(entry.name for entry in nsutil.NETNS_ETC_DIR.iterdir())
    for name in sorted(names):
        match = NAME_PATTERN.match(name)
        if not match or int(match.group(1)) == os.getpid() or _owner_alive(int(match.group(1))):
            continue
        log.info("removing stale namespace %s", name)
        try:
            nsutil.delete_netns(name)
            removed.append(name)
        except Exception:
            log.exception("removing stale namespace %s", name)
    return removed
