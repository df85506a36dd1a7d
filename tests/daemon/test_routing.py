"""Per-link routing keyed on the device: two tethered phones on one subnet and gateway."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.netns

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from braid.daemon.routing.policy import LinkRouting, Routing, prefixes_of
    routing = Routing(Path(sys.argv[1]))
    routing.raise_limits()
    for slot, device in enumerate(("usb0", "usb1")):
        view = routing.view(device)
        routing.apply(LinkRouting(
            device=device, ifindex=view.ifindex, slot=slot,
            addresses4=tuple(a for a, _ in view.addresses4),
            prefixes4=prefixes_of(view.addresses4), gateway4=view.gateway4))
    if sys.argv[2] == "remove":
        routing.remove_all()
    routing.close()
    """
)


@pytest.fixture
def netns(empty_netns: str) -> str:
    name = empty_netns
    ip = ["ip", "-n", name]
    for i, device in enumerate(("usb0", "usb1")):
        subprocess.run(
            [*ip, "link", "add", device, "type", "veth", "peer", "name", f"phone{i}"],
            check=True,
        )
        subprocess.run([*ip, "link", "set", "dev", device, "up"], check=True)
        subprocess.run([*ip, "link", "set", "dev", f"phone{i}", "up"], check=True)
        # Two phones hand out the same subnet and gateway (as Android tethering does).
        subprocess.run([*ip, "addr", "add", f"198.18.42.{10 + i}/24", "dev", device], check=True)
        subprocess.run(
            [
                *ip,
                "route",
                "add",
                "default",
                "via",
                "198.18.42.129",
                "dev",
                device,
                "metric",
                str(700 + i),
            ],
            check=True,
        )
    return name


def run(netns: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, check=True
    ).stdout


def test_two_links_sharing_a_subnet_get_a_table_rule_and_endpoint_each(netns, tmp_path) -> None:
    pristine = run(netns, "ip", "rule") + run(netns, "ip", "mptcp", "endpoint")
    run(netns, sys.executable, "-c", SCRIPT, str(tmp_path), "keep")
    rules = run(netns, "ip", "rule")
    assert "from 198.18.42.10 lookup 18400" in rules
    assert "from 198.18.42.11 lookup 18401" in rules
    assert "default via 198.18.42.129 dev usb0" in run(
        netns, "ip", "route", "show", "table", "18400"
    )
    assert "default via 198.18.42.129 dev usb1" in run(
        netns, "ip", "route", "show", "table", "18401"
    )
    endpoints = run(netns, "ip", "mptcp", "endpoint")
    assert "198.18.42.10 id 180 subflow dev usb0" in endpoints
    assert "198.18.42.11 id 182 subflow dev usb1" in endpoints
    # The source address picks the device, though both share the subnet.
    route = run(netns, "ip", "route", "get", "198.19.0.1", "from", "198.18.42.11")
    assert "dev usb1" in route
    run(netns, sys.executable, "-c", SCRIPT, str(tmp_path), "remove")
    assert run(netns, "ip", "rule") + run(netns, "ip", "mptcp", "endpoint") == pristine
    assert run(netns, "ip", "route", "show", "table", "18400") == ""


@pytest.mark.parametrize(
    "saved",
    ['{"subflows": "eight"}', "[1, 2]", '{"subflows": 1e400, "add_addr_accepted": 0}', "\xff"],
)
def test_damaged_limits_record_is_reported_and_dropped(netns, tmp_path, saved: str) -> None:
    from braid.daemon.routing.policy import LIMITS_FILE

    (tmp_path / LIMITS_FILE).write_text(saved, errors="surrogateescape")
    before = run(netns, "ip", "mptcp", "limits")
    done = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            netns,
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from braid.daemon.routing.policy import Routing;"
            "r = Routing(Path(sys.argv[1])); r.restore_limits(); r.close()",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "is damaged" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / LIMITS_FILE).exists()
    assert run(netns, "ip", "mptcp", "limits") == before


FOREIGN = textwrap.dedent(
    """
    import json, logging, sys
    from braid.daemon.routing.policy import LinkRouting, Routing, prefixes_of
    logging.basicConfig(level=logging.INFO)
    routing = Routing()
    routing.take_over_endpoints = sys.argv[1] == "take-over"
    view = routing.view("usb0")
    routing.apply(LinkRouting(
        device="usb0", ifindex=view.ifindex, slot=0, backup=True,
        addresses4=tuple(a for a, _ in view.addresses4),
        prefixes4=prefixes_of(view.addresses4), gateway4=view.gateway4))
    print(json.dumps({"held": routing.held(), "endpoints": routing.endpoints()}))
    routing.remove("usb0")
    routing.close()
    """
)


@pytest.mark.parametrize("mode", ["beside", "take-over"])
def test_an_endpoint_another_program_holds(netns, mode: str) -> None:
    """NetworkManager 1.40+ adds an endpoint for its devices' addresses (here made with ip, as
    NetworkManager does: kernel-chosen id, subflow, the device); the kernel refuses braidd's
    for the same address. Beside the userspace path manager braidd leaves it (and says so);
    where the kernel's path manager opens the subflows braidd takes it over with its flags."""
    import json

    run(netns, "ip", "mptcp", "endpoint", "add", "198.18.42.10", "subflow", "dev", "usb0")
    (theirs,) = run(netns, "ip", "mptcp", "endpoint").splitlines()
    their_id = int(theirs.split(" id ")[1].split()[0])
    done = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", FOREIGN, mode],
        capture_output=True,
        text=True,
        check=True,
    )
    seen = json.loads(done.stdout)
    ifindex = int(run(netns, "cat", "/sys/class/net/usb0/ifindex"))
    if mode == "beside":
        assert seen["held"] == {"198.18.42.10": their_id}
        assert seen["endpoints"] == [
            {"id": their_id, "address": "198.18.42.10", "flags": "subflow", "ifindex": ifindex}
        ]
        assert "another program's" in done.stderr and "WARNING" not in done.stderr
        # braidd's removal leaves the other program's endpoint alone
        assert run(netns, "ip", "mptcp", "endpoint").splitlines() == [theirs]
    else:
        assert seen["held"] == {}
        assert seen["endpoints"] == [
            {"id": 180, "address": "198.18.42.10", "flags": "subflow backup", "ifindex": ifindex}
        ]
        assert "took over" in done.stderr
        assert run(netns, "ip", "mptcp", "endpoint") == ""


def test_another_programs_endpoint_in_braids_id_range_is_not_braids(netns, tmp_path) -> None:
    """The kernel numbers an endpoint added without an id upwards from the highest id in use:
    after braidd's 180, NetworkManager's next one is 181, inside Braid's range. Neither
    braidd's removal nor a cleanup after a crash may take it for Braid's."""
    script = textwrap.dedent(
        """
        import subprocess, sys
        from pathlib import Path
        from braid.daemon.routing.policy import LinkRouting, Routing, prefixes_of
        routing = Routing(Path(sys.argv[1]))
        view = routing.view("usb0")
        routing.apply(LinkRouting(
            device="usb0", ifindex=view.ifindex, slot=0,
            addresses4=tuple(a for a, _ in view.addresses4),
            prefixes4=prefixes_of(view.addresses4), gateway4=view.gateway4))
        subprocess.run(["ip", "mptcp", "endpoint", "add", "198.18.42.11", "subflow", "dev",
                        "usb1"], check=True)
        if sys.argv[2] == "crash":
            sys.exit(0)  # no cleanup: braidd's table, rule and endpoint stay
        routing.remove_all()
        """
    )
    theirs = "198.18.42.11 id 181 subflow dev usb1"
    run(netns, sys.executable, "-c", script, str(tmp_path), "stop")
    assert run(netns, "ip", "mptcp", "endpoint").strip() == theirs
    run(netns, "ip", "mptcp", "endpoint", "flush")
    run(netns, sys.executable, "-c", script, str(tmp_path), "crash")
    assert "198.18.42.10 id 180" in run(netns, "ip", "mptcp", "endpoint")
    run(
        netns,
        sys.executable,
        "-c",
        "import sys; from pathlib import Path; from braid.daemon.routing.policy import Routing;"
        "Routing(Path(sys.argv[1])).cleanup()",
        str(tmp_path),
    )
    assert run(netns, "ip", "mptcp", "endpoint").strip() == theirs
