"""What braid-server reads from and changes in the machine it runs on."""

from __future__ import annotations

import logging
import resource
import time

import psutil

from braid.server.policy import IPAddress, normalise

log = logging.getLogger(__name__)

MIN_SUBFLOWS = 8


def raise_subflow_limit(minimum: int = MIN_SUBFLOWS) -> int | None:
    """Make sure ``ip mptcp limits`` allows ``minimum`` subflows per connection.

    The limit binds on both ends: with the kernel's default of 2, a laptop
    with three links could never use the third. Never lowers anything.
    Returns the subflow limit now in force, or None if it could not be read.
    """
    cmd = f"ip mptcp limits set subflows {minimum}"
    try:
        from pyroute2 import MPTCP
    except ImportError as exc:
        log.warning("cannot check the MPTCP limits (%s); as root, run: %s", exc, cmd)
        return None
    try:
        mptcp = MPTCP()
    except Exception as exc:  # the netlink family is missing without MPTCP
        log.warning("cannot open the MPTCP netlink interface (%s); as root, run: %s", exc, cmd)
        return None
    try:
        current = _limits(mptcp)
        subflows = current.get("MPTCP_PM_ATTR_SUBFLOWS", 0)
        if subflows >= minimum:
            log.debug("MPTCP subflow limit is %d", subflows)
            return subflows
        try:
            mptcp.limits(
                "set",
                subflows=minimum,
                add_addr_accepted=current.get("MPTCP_PM_ATTR_RCV_ADD_ADDRS", 0),
            )
        except Exception as exc:
            log.warning(
                "the MPTCP subflow limit is %d, so clients cannot use more than %d links, "
                "and raising it failed (%s): as root, run: %s",
                subflows,
                subflows,
                exc,
                cmd,
            )
            return subflows
        log.info("raised the MPTCP subflow limit from %d to %d", subflows, minimum)
        return minimum
    except Exception as exc:
        log.warning("cannot read the MPTCP limits (%s); as root, run: %s", exc, cmd)
        return None
    finally:
        mptcp.close()


def read_mptcp_limits() -> dict[str, int] | None:
    """This machine's MPTCP limits (``ip mptcp limits``), or None when they cannot be read."""
    try:
        from pyroute2 import MPTCP

        mptcp = MPTCP()
    except Exception:
        return None
    try:
        current = _limits(mptcp)
    except Exception:
        return None
    finally:
        mptcp.close()
    return {
        "subflows": int(current.get("MPTCP_PM_ATTR_SUBFLOWS", 0)),
        "add_addr_accepted": int(current.get("MPTCP_PM_ATTR_RCV_ADD_ADDRS", 0)),
    }


def raise_descriptor_limit() -> int:
    """Raise the soft limit on open files to the hard one; returns the soft limit now in force.

    The soft limit is often 1024 while the hard one (systemd's LimitNOFILE, or
    the default of 524288) is far higher: every relayed flow takes two descriptors.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return soft
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the limit of open files from %d (%s)", soft, exc)
        return soft
    log.debug("raised the limit of open files from %d to %d", soft, target)
    return target


def _limits(mptcp) -> dict[str, int]:
    reply = mptcp.limits("show")
    return {name: value for msg in reply for name, value in msg["attrs"]}


class OwnAddresses:
    """The server's interface addresses, re-read at most every ``ttl`` seconds.

    Addresses come and go (DHCP, SLAAC privacy addresses); a short cache keeps
    a burst of requests from reading them again for each one.
    """

    def __init__(self, ttl: float = 5.0, extra: tuple[IPAddress, ...] = ()) -> None:
        self.ttl = ttl
        self.extra = frozenset(normalise(a) for a in extra)
        self._cached: frozenset[IPAddress] = frozenset()
        self._read_at = -float("inf")

    def get(self) -> frozenset[IPAddress]:
        now = time.monotonic()
        if now - self._read_at >= self.ttl:
            self._cached = self._read() | self.extra
            self._read_at = now
        return self._cached

    @staticmethod
    def _read() -> frozenset[IPAddress]:
        found: set[IPAddress] = set()
        try:
            interfaces = psutil.net_if_addrs()
        except OSError as exc:
            log.warning("cannot list this server's addresses: %s", exc)
            return frozenset()
        for addrs in interfaces.values():
            for addr in addrs:
                try:
                    found.add(normalise(addr.address))
                except ValueError:
                    continue  # MAC addresses (AF_PACKET) and the like
        return frozenset(found)
