"""Per-link policy routing and MPTCP endpoints.

For every link Braid uses it installs, keyed on the device (tethered phones
often share one subnet and gateway):

- a routing table of its own: the default route via the link's gateway, by
  device, and the link's own prefixes;
- ``ip rule from <link address> lookup <table>`` for each of its addresses,
  so a subflow bound to that address leaves by that link (without it, extra
  subflows leave by the main table's default route and are dropped by the
  ISP's reverse-path filter);
- an MPTCP endpoint per address with the device and the ``subflow`` flag
  (plus ``backup`` for backup links), so the kernel opens one subflow per link.

An address may already have an endpoint of another program's: NetworkManager 1.40 and later
adds one for every device with a default route, and the kernel refuses a second endpoint for
an address. While braidd runs the userspace path manager no endpoint is used for new
connections, so braidd leaves that one in place (NetworkManager would delete braidd's on the
device's next activation and add its own again). Only where the kernel's own path manager
opens the subflows (no userspace one) do the endpoint's flags decide, and braidd takes it over
(``take_over_endpoints``). docs/ARCHITECTURE.md has the experiment.

Everything Braid owns is recognisable without a record: tables and rule
priorities in a reserved range, rules and routes with Braid's protocol
number, endpoints with an id in a reserved range *and* the address of Braid's
rule for that id's slot. The id alone is not enough: the kernel numbers other
programs' endpoints upwards from the highest id in use, so NetworkManager's
land in Braid's range once braidd has added its own (seen: 185 and 186 after
braidd's 180–184). That is what lets ``cleanup`` remove a crashed run's
leftovers and nothing else; a running braidd deletes only the ids it added.

The calls block (netlink round trips of a few milliseconds); the daemon runs
them on one worker thread so changes never interleave.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

from pyroute2 import MPTCP, IPRoute
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic.mptcp import MPTCP_PM_CMD_SET_FLAGS, mptcp_msg

from braid.files import load_json, write_json

log = logging.getLogger(__name__)

TABLE_BASE = 18400
SLOTS = 32
RULE_PRIORITY_BASE = 18400
ENDPOINT_ID_BASE = 180  # ids 180..243, two per slot (IPv4, IPv6)
RTPROT_BRAID = 98  # marks the routes and rules Braid adds
# System-wide mode: captured UDP is marked, then routed to loopback for TPROXY by this table.
CAPTURE_TABLE = TABLE_BASE + SLOTS  # 18432
# Before the per-link "from <address>" rules, or a captured datagram with a source address
# already chosen would leave by its link instead of looping back to braidd.
CAPTURE_PRIORITY = RULE_PRIORITY_BASE - 1

FLAG_SIGNAL = 1
FLAG_SUBFLOW = 2
FLAG_BACKUP = 4

SUBFLOWS_NEEDED = 8
LIMITS_FILE = "mptcp-limits.json"

ERRNO_EXISTS = 17
ERRNO_BUSY = 16  # an endpoint id that is taken
ERRNO_NOENT = 2
ERRNO_NOSRCH = 3


def table_for(slot: int) -> int:
    return TABLE_BASE + slot


def owns_table(table: int) -> bool:
    return TABLE_BASE <= table <= CAPTURE_TABLE


def owns_priority(priority: int) -> bool:
    return CAPTURE_PRIORITY <= priority < RULE_PRIORITY_BASE + SLOTS


def owns_endpoint(endpoint_id: int) -> bool:
    return ENDPOINT_ID_BASE <= endpoint_id < ENDPOINT_ID_BASE + 2 * SLOTS


@dataclass(frozen=True)
class LinkRouting:
    """What the routing of one link should be; compared to decide when to redo it."""

    device: str
    ifindex: int
    slot: int
    addresses4: tuple[str, ...] = ()
    addresses6: tuple[str, ...] = ()
    prefixes4: tuple[str, ...] = ()
    prefixes6: tuple[str, ...] = ()
    gateway4: str | None = None
    gateway6: str | None = None
    backup: bool = False

    @property
    def table(self) -> int:
        return table_for(self.slot)

    @property
    def priority(self) -> int:
        return RULE_PRIORITY_BASE + self.slot

    def endpoint_id(self, family: int) -> int:
        return ENDPOINT_ID_BASE + 2 * self.slot + (0 if family == socket.AF_INET else 1)


@dataclass
class DeviceView:
    """A device as the kernel sees it now: enough to decide whether it can carry traffic."""

    name: str
    ifindex: int
    up: bool
    carrier: bool
    addresses4: list[tuple[str, int]] = field(default_factory=list)
    addresses6: list[tuple[str, int]] = field(default_factory=list)
    gateway4: str | None = None
    gateway6: str | None = None
    has_default4: bool = False
    has_default6: bool = False


def _attr(msg, name, default=None):
    return msg.get_attr(name, default) if hasattr(msg, "get_attr") else default


class Routing:
    """Owns Braid's routing state in the current network namespace."""

    def __init__(self, state_dir: Path | None = None) -> None:
        self._ipr = IPRoute()
        self._mptcp = MPTCP()
        self._state_dir = state_dir
        self._applied: dict[str, LinkRouting] = {}
        self._withdrawn: set[str] = set()
        #: Replace another program's endpoint for a link's address (set when the in-kernel
        #: path manager opens the subflows, so that the endpoint's flags are braidd's).
        self.take_over_endpoints = False
        #: Addresses whose endpoint another program holds: address -> its endpoint id.
        self._held: dict[str, int] = {}
        #: The endpoints this braidd added: id -> address (never delete or change another's).
        self._mine: dict[int, str] = {}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._ipr.close()
        with contextlib.suppress(Exception):
            self._mptcp.close()

    # -- reading the system -------------------------------------------------

    def view(self, device: str) -> DeviceView | None:
        """The device's state, addresses and default gateways, or None if it does not exist."""
        return self.views([device])[device]

    def views(self, devices: list[str]) -> dict[str, DeviceView | None]:
        """Every named device at once: one dump each of links, addresses and default routes."""
        out: dict[str, DeviceView | None] = dict.fromkeys(devices)
        by_index: dict[int, DeviceView] = {}
        wanted = set(devices)
        for link in self._ipr.get_links():
            name = _attr(link, "IFLA_IFNAME")
            if name not in wanted:
                continue
            flags = link["flags"]
            operstate = _attr(link, "IFLA_OPERSTATE", "UNKNOWN")
            view = DeviceView(
                name=name,
                ifindex=link["index"],
                up=bool(flags & 1),  # IFF_UP
                carrier=operstate in ("UP", "UNKNOWN") and bool(flags & 0x10000),  # IFF_LOWER_UP
            )
            out[name] = by_index[view.ifindex] = view
        if not by_index:
            return out
        for msg in self._ipr.get_addr():
            view = by_index.get(msg["index"])
            if view is None:
                continue
            addr = _attr(msg, "IFA_ADDRESS")
            if msg["family"] == socket.AF_INET:
                addr = _attr(msg, "IFA_LOCAL", addr)
                view.addresses4.append((addr, msg["prefixlen"]))
            elif msg["family"] == socket.AF_INET6 and msg["scope"] == 0:
                if msg["flags"] & 0x20:  # IFA_F_DADFAILED
                    continue
                if _attr(msg, "IFA_FLAGS", msg["flags"]) & 0x40:  # tentative
                    continue
                view.addresses6.append((addr, msg["prefixlen"]))
        for family in (socket.AF_INET, socket.AF_INET6):
            for route in self._ipr.get_routes(family=family, table=254):
                view = by_index.get(_attr(route, "RTA_OIF"))
                if route["dst_len"] != 0 or view is None:
                    continue
                gateway = _attr(route, "RTA_GATEWAY")
                if family == socket.AF_INET:
                    view.has_default4 = True
                    view.gateway4 = view.gateway4 or gateway
                else:
                    view.has_default6 = True
                    view.gateway6 = view.gateway6 or gateway
        return out

    # -- limits -------------------------------------------------------------

    def _limits(self) -> tuple[int, int]:
        (msg,) = self._mptcp.limits("show")
        return (
            msg.get_attr("MPTCP_PM_ATTR_SUBFLOWS") or 0,
            msg.get_attr("MPTCP_PM_ATTR_RCV_ADD_ADDRS") or 0,
        )

    def raise_limits(self) -> None:
        """Raise the subflow limit (default 2) and remember the old values to restore."""
        subflows, add_addr = self._limits()
        if subflows >= SUBFLOWS_NEEDED:
            return
        if self._state_dir is not None:
            saved = self._state_dir / LIMITS_FILE
            if not saved.exists():  # a crashed run's record holds the true original
                saved.parent.mkdir(parents=True, exist_ok=True)
                write_json(saved, {"subflows": subflows, "add_addr_accepted": add_addr})
        self._mptcp.limits("set", subflows=SUBFLOWS_NEEDED, add_addr_accepted=add_addr)
        log.info("MPTCP subflow limit raised from %d to %d", subflows, SUBFLOWS_NEEDED)

    def restore_limits(self) -> None:
        if self._state_dir is None:
            return
        saved = self._state_dir / LIMITS_FILE
        try:
            old = load_json(saved.read_text())
            subflows, accepted = int(old["subflows"]), int(old["add_addr_accepted"])
            if not (0 <= subflows <= 255 and 0 <= accepted <= 255):
                raise ValueError("limits out of range")
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cannot read %s (%s); leaving the MPTCP limits as they are", saved, exc)
            return
        except (ValueError, TypeError, KeyError, OverflowError) as exc:
            log.warning(
                "%s is damaged (%r); leaving the MPTCP limits as they are (see: ip mptcp limits)",
                saved,
                exc,
            )
            with contextlib.suppress(OSError):
                saved.unlink()  # unusable: the next run records the limits it finds
            return
        self._mptcp.limits("set", subflows=subflows, add_addr_accepted=accepted)
        saved.unlink(missing_ok=True)
        log.info("MPTCP limits restored to subflows %s", old["subflows"])

    # -- links --------------------------------------------------------------

    def apply(self, want: LinkRouting) -> None:
        """Make the link's table, rules and endpoints match ``want`` (idempotent)."""
        have = self._applied.get(want.device)
        if have == want:
            return
        if have is not None and replace(have, backup=want.backup) == want:
            self.set_backup(want.device, want.backup)  # keeps the open subflows
            return
        withdrawn = want.device in self._withdrawn
        if have is not None:
            self.remove(want.device)
        self._install_routes(want)
        self._install_rules(want)
        if withdrawn:
            self._withdrawn.add(want.device)
        else:
            self._install_endpoints(want)
        self._applied[want.device] = want
        log.info(
            "link %s: table %d, addresses %s, gateway %s%s",
            want.device,
            want.table,
            ", ".join(want.addresses4 + want.addresses6) or "none",
            want.gateway4 or want.gateway6 or "none (on-link)",
            ", backup" if want.backup else "",
        )

    def reinstall_routes(self, device: str) -> None:
        """Re-add routes the kernel flushed when the device went down (it sends no event for them)."""
        want = self._applied.get(device)
        if want is not None:
            self._install_routes(want)

    def remove(self, device: str) -> None:
        want = self._applied.pop(device, None)
        if want is None:
            return
        self._withdrawn.discard(device)
        for family in (socket.AF_INET, socket.AF_INET6):
            self._del_own_endpoint(want.endpoint_id(family))
        for address in want.addresses4 + want.addresses6:
            self._held.pop(address, None)
        self._flush_rules(lambda prio: prio == want.priority)
        self._flush_table(want.table)
        log.info("link %s: routing removed", device)

    def applied(self) -> dict[str, LinkRouting]:
        return dict(self._applied)

    def remove_all(self) -> None:
        for device in list(self._applied):
            try:
                self.remove(device)
            except NetlinkError as exc:
                log.warning("removing routing of %s: %s", device, exc)
        self.cleanup()

    def cleanup(self) -> None:
        """Remove everything in Braid's ranges, whoever left it, and restore the limits."""
        for endpoint in self.endpoints():
            if endpoint["id"] in self._mine or self._left_by_braid(endpoint):
                self._del_endpoint(endpoint["id"])
        self._mine.clear()
        self._flush_rules(owns_priority)
        for slot in range(SLOTS):
            self._flush_table(table_for(slot))
        self._flush_table(CAPTURE_TABLE)
        self.restore_limits()
        self._applied.clear()
        self._held.clear()

    # -- internals ----------------------------------------------------------

    def _install_routes(self, want: LinkRouting) -> None:
        routes: list[dict] = []
        for prefix in want.prefixes4:
            routes.append({"dst": prefix, "family": socket.AF_INET, "scope": 253})
        for prefix in want.prefixes6:
            routes.append({"dst": prefix, "family": socket.AF_INET6})
        if want.addresses4:
            route = {"dst": "0.0.0.0/0", "family": socket.AF_INET}
            if want.gateway4:
                route["gateway"] = want.gateway4
            else:
                route["scope"] = 253
            routes.append(route)
        if want.addresses6:
            route = {"dst": "::/0", "family": socket.AF_INET6}
            if want.gateway6:
                route["gateway"] = want.gateway6
            routes.append(route)
        for route in routes:
            try:
                self._ipr.route(
                    "replace", table=want.table, oif=want.ifindex, proto=RTPROT_BRAID, **route
                )
            except NetlinkError as exc:
                # A gateway the kernel cannot reach yet (device still coming up) is retried later.
                log.warning("link %s: route %s: %s", want.device, route["dst"], exc.args[-1])

    def _install_rules(self, want: LinkRouting) -> None:
        for family, addresses, length in (
            (socket.AF_INET, want.addresses4, 32),
            (socket.AF_INET6, want.addresses6, 128),
        ):
            for address in addresses:
                try:
                    self._ipr.rule(
                        "add",
                        family=family,
                        src=address,
                        src_len=length,
                        table=want.table,
                        priority=want.priority,
                        protocol=RTPROT_BRAID,
                    )
                except NetlinkError as exc:
                    if exc.code != ERRNO_EXISTS:
                        raise

    def _left_by_braid(self, endpoint: dict) -> bool:
        """An endpoint a braidd that stopped without cleaning up added: its id is in Braid's
        range and its address is the source of Braid's rule for that id's slot."""
        endpoint_id = endpoint["id"]
        if endpoint_id is None or not owns_endpoint(endpoint_id):
            return False
        priority = RULE_PRIORITY_BASE + (endpoint_id - ENDPOINT_ID_BASE) // 2
        family = socket.AF_INET6 if ":" in (endpoint["address"] or "") else socket.AF_INET
        return any(
            rule.get_attr("FRA_PRIORITY") == priority
            and rule.get_attr("FRA_SRC") == endpoint["address"]
            for rule in self._ipr.get_rules(family=family)
        )

    def _install_endpoints(self, want: LinkRouting) -> None:
        flags = FLAG_SUBFLOW | (FLAG_BACKUP if want.backup else 0)
        for family, addresses in (
            (socket.AF_INET, want.addresses4),
            (socket.AF_INET6, want.addresses6),
        ):
            if not addresses:
                continue
            endpoint_id = want.endpoint_id(family)
            self._del_own_endpoint(endpoint_id)
            key = "addr4" if family == socket.AF_INET else "addr6"
            try:
                self._mptcp.endpoint(
                    "add",
                    **{key: addresses[0]},
                    id=endpoint_id,
                    flags=flags,
                    # pyroute2 0.9.7 declares the index as raw bytes: pass it packed.
                    if_idx=struct.pack("=i", want.ifindex),
                )
                self._held.pop(addresses[0], None)
                self._mine[endpoint_id] = addresses[0]
            except NetlinkError as exc:
                if exc.code in (ERRNO_BUSY, ERRNO_EXISTS) and self._adopt(
                    endpoint_id, addresses[0]
                ):
                    continue
                if exc.code == ERRNO_BUSY:
                    # The kernel gave this id to another program's endpoint (it numbers them
                    # upwards from the highest in use). Only the kernel's path manager reads
                    # endpoints; braidd opens subflows by address and device.
                    log.info(
                        "link %s: MPTCP endpoint id %d is another program's; %s has none of "
                        "braidd's",
                        want.device,
                        endpoint_id,
                        addresses[0],
                    )
                    continue
                if exc.code != ERRNO_EXISTS:
                    raise
                self._foreign_endpoint(want, family, addresses[0], flags)

    def _adopt(self, endpoint_id: int, address: str) -> bool:
        """The endpoint braidd wants is there already, with its id and address: a braidd
        before this one added it (the kernel refuses a second one either way)."""
        if not any(e["id"] == endpoint_id and e["address"] == address for e in self.endpoints()):
            return False
        self._mine[endpoint_id] = address
        self._held.pop(address, None)
        return True

    def _foreign_endpoint(self, want: LinkRouting, family: int, address: str, flags: int) -> None:
        """The kernel refused braidd's endpoint: another program's holds ``address``."""
        holder = next((e for e in self.endpoints() if e["address"] == address), None)
        if holder is None or holder["id"] in self._mine:
            return  # gone in between, or braidd's own: the next pass retries
        if not self.take_over_endpoints:
            if self._held.get(address) != holder["id"]:
                log.info(
                    "link %s: %s has an MPTCP endpoint of another program's (id %d, %s; "
                    "NetworkManager adds these); braidd opens this link's subflows itself, "
                    "so it stays",
                    want.device,
                    address,
                    holder["id"],
                    holder["flags"] or "no flags",
                )
            self._held[address] = holder["id"]
            return
        self._del_endpoint(holder["id"])
        key = "addr4" if family == socket.AF_INET else "addr6"
        self._del_own_endpoint(want.endpoint_id(family))
        self._mptcp.endpoint(
            "add",
            **{key: address},
            id=want.endpoint_id(family),
            flags=flags,
            if_idx=struct.pack("=i", want.ifindex),
        )
        self._held.pop(address, None)
        self._mine[want.endpoint_id(family)] = address
        log.info(
            "link %s: took over the MPTCP endpoint of %s from another program (id %d): the "
            "kernel's path manager opens the subflows, so the flags must be braidd's",
            want.device,
            address,
            holder["id"],
        )

    def endpoints(self) -> list[dict]:
        """Every MPTCP endpoint of the namespace: id, address, flags (names) and device."""
        return [parse_endpoint(msg) for msg in self._mptcp.endpoint("show")]

    def held(self) -> dict[str, int]:
        """Links' addresses whose endpoint is another program's, with its id."""
        return dict(self._held)

    def install_capture_routing(self, mark: int) -> None:
        """``ip rule fwmark MARK lookup 18432`` with a local default route to loopback.

        Captured UDP is marked on output; this sends it back in through lo, where the
        nftables TPROXY rule hands it to braidd's transparent socket.
        """
        lo = self._ipr.link_lookup(ifname="lo")[0]
        for family, dst in ((socket.AF_INET, "0.0.0.0/0"), (socket.AF_INET6, "::/0")):
            self._ipr.route(
                "replace",
                family=family,
                dst=dst,
                type="local",
                oif=lo,
                table=CAPTURE_TABLE,
                proto=RTPROT_BRAID,
                scope=254 if family == socket.AF_INET else 0,  # host scope, as ip(8) sets it
            )
            try:
                self._ipr.rule(
                    "add",
                    family=family,
                    fwmark=mark,
                    fwmask=0xFFFFFFFF,
                    table=CAPTURE_TABLE,
                    priority=CAPTURE_PRIORITY,
                    protocol=RTPROT_BRAID,
                )
            except NetlinkError as exc:
                if exc.code != ERRNO_EXISTS:
                    raise

    def remove_capture_routing(self) -> None:
        self._flush_rules(lambda prio: prio == CAPTURE_PRIORITY)
        self._flush_table(CAPTURE_TABLE)

    def set_backup(self, device: str, backup: bool) -> None:
        """Flip the link's backup flag in place; open connections learn it through MP_PRIO."""
        want = self._applied.get(device)
        if want is None or want.backup == backup:
            return
        flags = FLAG_SUBFLOW | (FLAG_BACKUP if backup else 0)
        for family, addresses in (
            (socket.AF_INET, want.addresses4),
            (socket.AF_INET6, want.addresses6),
        ):
            if addresses and want.endpoint_id(family) in self._mine:
                self._set_flags(want.endpoint_id(family), family, addresses[0], flags)
        self._applied[device] = replace(want, backup=backup)
        log.info("link %s: %s", device, "backup" if backup else "no longer backup")

    def _set_flags(self, endpoint_id: int, family: int, address: str, flags: int) -> None:
        # pyroute2 0.9.7 has no call for MPTCP_PM_CMD_SET_FLAGS: build the request here.
        msg = mptcp_msg()
        msg["cmd"] = MPTCP_PM_CMD_SET_FLAGS
        msg["version"] = 1
        key = "MPTCP_PM_ADDR_ATTR_ADDR4" if family == socket.AF_INET else "MPTCP_PM_ADDR_ATTR_ADDR6"
        msg["attrs"] = [
            (
                "MPTCP_PM_ATTR_ADDR",
                {
                    "attrs": [
                        ("MPTCP_PM_ADDR_ATTR_FAMILY", family),
                        ("MPTCP_PM_ADDR_ATTR_ID", endpoint_id),
                        (key, address),
                        ("MPTCP_PM_ADDR_ATTR_FLAGS", flags),
                    ]
                },
                0x8000,  # NLA_F_NESTED
            )
        ]
        self._mptcp._run_sync_cleanup(
            self._mptcp.asyncore.nlm_request,
            msg,
            msg_type=self._mptcp.prid,
            msg_flags=NLM_F_REQUEST | NLM_F_ACK,
        )

    def endpoint_present(self, device: str) -> bool:
        return device in self._applied and device not in self._withdrawn

    def withdraw(self, device: str) -> None:
        """Take a dead link out of every MPTCP connection at once: delete its endpoints.

        The kernel closes the link's subflows and resends their unacknowledged data on the
        others; its table and rules stay, so the health probes keep flowing through it.
        """
        want = self._applied.get(device)
        if want is None or device in self._withdrawn:
            return
        for family in (socket.AF_INET, socket.AF_INET6):
            self._del_own_endpoint(want.endpoint_id(family))
        self._withdrawn.add(device)
        log.info("link %s: endpoints withdrawn", device)

    def reinstate(self, device: str) -> None:
        """The link works again: re-add its endpoints (and the routes a flap flushed)."""
        want = self._applied.get(device)
        if want is None or device not in self._withdrawn:
            return
        self._withdrawn.discard(device)
        self._install_routes(want)
        self._install_endpoints(want)
        log.info("link %s: endpoints back", device)

    def _del_own_endpoint(self, endpoint_id: int) -> None:
        """Delete an endpoint this braidd added; an id it did not add may be another's."""
        if self._mine.pop(endpoint_id, None) is not None:
            self._del_endpoint(endpoint_id)

    def _del_endpoint(self, endpoint_id: int) -> None:
        try:
            self._mptcp.endpoint("del", id=endpoint_id)
        except NetlinkError as exc:
            if exc.code not in (ERRNO_NOENT, 22):  # EINVAL: no such id
                raise

    def _flush_rules(self, priority_matches) -> None:
        for family in (socket.AF_INET, socket.AF_INET6):
            for rule in list(self._ipr.get_rules(family=family)):
                priority = rule.get_attr("FRA_PRIORITY")
                if priority is None or not priority_matches(priority):
                    continue
                try:
                    self._ipr.rule(
                        "del",
                        family=family,
                        priority=priority,
                        table=rule.get_attr("FRA_TABLE") or rule["table"],
                        src=rule.get_attr("FRA_SRC"),
                        src_len=rule["src_len"],
                    )
                except NetlinkError as exc:
                    if exc.code != ERRNO_NOENT:
                        raise

    def _flush_table(self, table: int) -> None:
        for family in (socket.AF_INET, socket.AF_INET6):
            for route in list(self._ipr.get_routes(family=family, table=table)):
                if route.get_attr("RTA_TABLE") != table:
                    continue
                try:
                    self._ipr.route("del", **_route_key(route, table))
                except NetlinkError as exc:
                    if exc.code not in (ERRNO_NOENT, ERRNO_NOSRCH):
                        raise


FLAG_NAMES = ((FLAG_SIGNAL, "signal"), (FLAG_SUBFLOW, "subflow"), (FLAG_BACKUP, "backup"))


def parse_endpoint(msg) -> dict:
    attrs = msg.get_attr("MPTCP_PM_ATTR_ADDR")
    get = attrs.get_attr if attrs is not None else (lambda name: None)
    flags = get("MPTCP_PM_ADDR_ATTR_FLAGS") or 0
    names = [name for bit, name in FLAG_NAMES if flags & bit]
    if flags & 8:
        names.append("fullmesh")
    index = get("MPTCP_PM_ADDR_ATTR_IF_IDX")
    if isinstance(index, str):  # pyroute2 0.9.7 gives the raw bytes as "02:00:00:00"
        index = bytes.fromhex(index.replace(":", ""))
    if isinstance(index, bytes):
        index = struct.unpack("=i", index[:4])[0] if len(index) >= 4 else None
    return {
        "id": get("MPTCP_PM_ADDR_ATTR_ID"),
        "address": get("MPTCP_PM_ADDR_ATTR_ADDR4") or get("MPTCP_PM_ADDR_ATTR_ADDR6"),
        "flags": " ".join(names),
        "ifindex": index or None,
    }


def _route_key(route, table: int) -> dict:
    family = route["family"]
    dst = route.get_attr("RTA_DST") or ("0.0.0.0" if family == socket.AF_INET else "::")
    key = {
        "family": family,
        "table": table,
        "dst": f"{dst}/{route['dst_len']}",
        "scope": route["scope"],
    }
    oif = route.get_attr("RTA_OIF")
    if oif is not None:
        key["oif"] = oif
    return key


def prefixes_of(addresses: list[tuple[str, int]]) -> tuple[str, ...]:
    nets = {str(ipaddress.ip_interface(f"{a}/{n}").network) for a, n in addresses}
    return tuple(sorted(n for n in nets if not n.endswith(("/32", "/128"))))
