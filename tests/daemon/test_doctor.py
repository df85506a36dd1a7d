"""The doctor's verdicts from observations, and its readers of /proc text: pure, no root."""

from __future__ import annotations

from pathlib import Path

from braid.cli_doctor import render
from braid.daemon.doctor import (
    LinkObservation,
    Observations,
    default_route_device,
    diagnose,
    diagnose_link,
    parse_netstat,
    read_rp_filter,
)


def healthy(name: str = "eth0", **changes) -> LinkObservation:
    link = LinkObservation(
        name=name,
        kind="ethernet",
        address="198.18.1.2",
        default_route=name == "eth0",
        tcp="ok",
        connect_ms=10.0,
        mptcp=True,
        probed=True,
        udp_alive=True,
        rtt_ms=12.0,
        jitter_ms=0.5,
        loss=0.0,
        rp_filter=0,
    )
    for key, value in changes.items():
        setattr(link, key, value)
    return link


def levels(link: LinkObservation) -> dict[str, str]:
    return {f.check: f.level for f in diagnose_link(link, 7443)}


COUNTERS = {"MPCapableSYNTX": 10, "MPCapableSYNACKRX": 10, "MPJoinSynTx": 4, "MPJoinSynAckRx": 4}


def test_a_healthy_link_has_only_ok_findings() -> None:
    assert set(levels(healthy()).values()) == {"ok"}
    result = diagnose(
        Observations(
            server="198.18.20.2:7443",
            connected=True,
            links=[healthy(), healthy("wlan0")],
            limits={"subflows": 8, "add_addr_accepted": 0},
            counters=COUNTERS,
            server_info={"version": "0.1.0", "mptcp_limits": {"subflows": 8}},
        ),
        7443,
    )
    assert result["level"] == "ok"
    assert "nothing wrong found" in render(result)


def test_a_fallback_to_plain_tcp_means_mptcp_is_stripped() -> None:
    findings = {f.check: f for f in diagnose_link(healthy(mptcp=False), 7443)}
    assert findings["tcp"].level == "ok"
    assert findings["mptcp"].level == "error"
    assert "strips the MPTCP option" in findings["mptcp"].text


def test_a_join_that_does_not_come_up_is_an_error() -> None:
    assert levels(healthy(join=True))["join"] == "ok"
    assert "join" not in levels(healthy())  # the link that carried the test tunnel
    findings = {f.check: f for f in diagnose_link(healthy(join=False), 7443)}
    assert findings["join"].level == "error" and "MP_JOIN" in findings["join"].text
    refused = {f.check: f for f in diagnose_link(healthy(join=False, join_error="EPERM"), 1)}
    assert "EPERM" in refused["join"].text


def test_a_link_without_subflows_in_spread_tunnels_is_reported() -> None:
    assert levels(healthy(spread_tunnels=2, subflows=0))["subflows"] == "error"
    assert levels(healthy(spread_tunnels=2, subflows=2))["subflows"] == "ok"
    assert "subflows" not in levels(healthy(spread_tunnels=0))  # nothing spread: nothing to say
    # a dead link is not expected to carry any
    assert "subflows" not in levels(healthy(spread_tunnels=2, udp_alive=False))


def test_udp_blocked_while_tcp_passes() -> None:
    findings = {f.check: f for f in diagnose_link(healthy(udp_alive=False), 7443)}
    assert findings["udp"].level == "error"
    assert "blocked" in findings["udp"].text and "TCP gets through" in findings["udp"].text
    assert "rtt" not in findings
    assert levels(healthy(probed=False))["udp"] == "warning"


def test_tcp_that_does_not_connect_says_why() -> None:
    findings = {f.check: f for f in diagnose_link(healthy(tcp="timeout", mptcp=None), 7443)}
    assert findings["tcp"].level == "error" and "no answer" in findings["tcp"].text
    assert "mptcp" not in findings


def test_strict_rp_filter_warns_only_off_the_default_route() -> None:
    assert levels(healthy("wlan0", rp_filter=1, routed=True))["rp_filter"] == "warning"
    assert levels(healthy("wlan0", rp_filter=1))["rp_filter"] == "error"  # no rule of Braid's
    assert levels(healthy("eth0", rp_filter=1))["rp_filter"] == "ok"
    assert levels(healthy("wlan0", rp_filter=2))["rp_filter"] == "ok"


def test_lossy_probes_warn_and_never_links_are_left_alone() -> None:
    assert levels(healthy(loss=0.25))["rtt"] == "warning"
    assert levels(healthy(priority="never", tcp=None)) == {"link": "ok"}
    assert levels(healthy(state="down", address=None)) == {"link": "error"}
    assert levels(healthy(address=None)) == {"link": "error"}


def test_the_laptop_limits_and_counters() -> None:
    def laptop(**kw) -> dict[str, str]:
        obs = Observations(server="s:1", connected=True, links=[healthy(), healthy("wlan0")], **kw)
        return {f["check"]: f["level"] for f in diagnose(obs, 1)["laptop"]}

    good = {"subflows": 8, "add_addr_accepted": 0}
    assert laptop(limits=good, counters=COUNTERS) == {"limits": "ok", "counters": "ok"}
    assert laptop(limits={"subflows": 0, "add_addr_accepted": 0}, counters=COUNTERS)["limits"] == (
        "error"
    )
    assert laptop(limits=None, counters=COUNTERS)["limits"] == "warning"
    fell_back = {**COUNTERS, "MPCapableFallbackSYNACK": 2}
    assert laptop(limits=good, counters=fell_back)["counters"] == "warning"
    assert laptop(limits=good, counters={})["counters"] == "warning"
    unpaired = diagnose(Observations(), None)
    assert unpaired["laptop"][0]["check"] == "server" and unpaired["level"] == "error"


def test_data_dropped_past_the_window_is_told_but_blames_no_path() -> None:
    def counters_finding(counters: dict[str, int]) -> dict:
        obs = Observations(
            server="s:1",
            connected=True,
            links=[healthy()],
            limits={"subflows": 8, "add_addr_accepted": 0},
            counters=counters,
        )
        return next(f for f in diagnose(obs, 1)["laptop"] if f["check"] == "counters")

    dropped = counters_finding({**COUNTERS, "NoDSSInWindow": 161, "MPTCPRetrans": 8})
    assert dropped["level"] == "ok"
    assert "161 incoming segments received and then dropped" in dropped["text"]
    assert "dropped" not in counters_finding(COUNTERS)["text"]


def test_the_servers_limits_bind_the_links_too() -> None:
    def server(**kw) -> list[dict]:
        links = [healthy(), healthy("wlan0"), healthy("usb0")]
        obs = Observations(server="s:1", connected=True, links=links, **kw)
        return diagnose(obs, 1)["server_checks"]

    good = server(server_info={"version": "0.1.0", "mptcp_limits": {"subflows": 8}})
    assert [f["level"] for f in good] == ["ok"] and "subflows 8" in good[0]["text"]
    low = server(server_info={"version": "0.1.0", "mptcp_limits": {"subflows": 1}})
    assert low[0]["level"] == "error" and "ip mptcp limits set subflows 8" in low[0]["text"]
    unread = server(server_info={"version": "0.1.0", "mptcp_limits": None})
    assert unread[0]["level"] == "warning" and "net.mptcp.enabled" in unread[0]["text"]
    old = server(server_info_error="the server is too old to say (upgrade braid-server there)")
    assert old[0]["level"] == "warning" and "too old" in old[0]["text"]
    assert diagnose(Observations(server="s:1", connected=False), 1)["server_checks"] == []
    text = render(
        diagnose(
            Observations(
                server="s:1",
                connected=True,
                links=[healthy()],
                server_info={"version": "0.1.0", "mptcp_limits": {"subflows": 8}},
            ),
            1,
        )
    )
    assert "the server:" in text and "braid-server 0.1.0" in text


def test_a_malformed_server_answer_is_said_not_raised() -> None:
    from braid.daemon.doctor import _server_info

    good = b'{"version": "0.1.0", "mptcp_limits": {"subflows": 8, "add_addr_accepted": 0}}'
    assert _server_info(good) == (
        {"version": "0.1.0", "mptcp_limits": {"subflows": 8, "add_addr_accepted": 0}},
        None,
    )
    assert _server_info(b'{"version": "0.1.0", "mptcp_limits": null}')[0] == {
        "version": "0.1.0",
        "mptcp_limits": None,
    }
    for bad in (
        b"not json",
        b"[" * 20000 + b"]" * 20000,
        b"[]",
        b'{"version": 7}',
        b'{"version": "1", "mptcp_limits": []}',
        b'{"version": "1", "mptcp_limits": {"subflows": "x"}}',
        b'{"version": "1", "mptcp_limits": {"subflows": 1e400}}',
        b'{"version": "1", "mptcp_limits": {"subflows": true}}',
        b'{"version": "1", "mptcp_limits": {"subflows": -1}}',
    ):
        info, why = _server_info(bad)
        assert info is None and why, bad[:40]
    obs = Observations(server="s:1", connected=True, links=[healthy()])
    obs.server_info, obs.server_info_error = _server_info(b'{"version": 7}')
    assert diagnose(obs, 1)["server_checks"][0]["level"] == "warning"


def test_a_link_behind_a_captive_portal_needs_sign_in_not_repair() -> None:
    findings = diagnose_link(healthy(connectivity="portal", tcp=None), 1)
    assert [(f.check, f.level) for f in findings] == [("portal", "warning")]
    assert "sign-in required" in findings[0].text


def test_networkmanagers_endpoints_are_reported() -> None:
    theirs = {"id": 1, "address": "198.18.1.2", "flags": "subflow", "ifindex": 2, "device": "eth0"}

    def endpoints(**kw) -> list[dict]:
        links = [healthy(addresses=["198.18.1.2"]), healthy("wlan0")]
        obs = Observations(server="s:1", connected=True, links=links, counters=COUNTERS, **kw)
        return [f for f in diagnose(obs, 1)["laptop"] if f["check"] == "endpoints"]

    assert endpoints() == []
    (beside,) = endpoints(endpoints=[theirs])
    assert beside["level"] == "ok" and "unused" in beside["text"] and "link eth0" in beside["text"]
    (deciding,) = endpoints(endpoints=[theirs], userspace_pm=False)
    assert deciding["level"] == "warning" and "mptcp-flags disabled" in deciding["text"]
    (unread,) = endpoints(endpoints=None)
    assert unread["level"] == "warning"


def test_counters_count_from_braidd_start_but_gauges_do_not() -> None:
    from braid.daemon.doctor import since

    now = {"MPCapableFallbackACK": 5, "MPCurrEstab": 4, "MPJoinSynTx": 9}
    start = {"MPCapableFallbackACK": 5, "MPCurrEstab": 2, "MPJoinSynTx": 3}
    assert since(now, start) == {"MPCapableFallbackACK": 0, "MPCurrEstab": 4, "MPJoinSynTx": 6}
    assert since(now, None) == now


def test_parse_netstat_reads_one_group() -> None:
    text = (
        "TcpExt: SyncookiesSent Other\nTcpExt: 1 2\n"
        "MPTcpExt: MPCapableSYNRX MPJoinSynRx\nMPTcpExt: 5 7\n"
    )
    assert parse_netstat(text, "MPTcpExt") == {"MPCapableSYNRX": 5, "MPJoinSynRx": 7}
    assert parse_netstat("", "MPTcpExt") == {}


def test_rp_filter_is_the_larger_of_all_and_the_interface(tmp_path: Path) -> None:
    for name, value in (("all", "0"), ("wlan0", "1"), ("eth0", "2")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "rp_filter").write_text(value + "\n")
    assert read_rp_filter("wlan0", tmp_path) == 1
    assert read_rp_filter("eth0", tmp_path) == 2
    (tmp_path / "all" / "rp_filter").write_text("1\n")
    assert read_rp_filter("eth0", tmp_path) == 2 and read_rp_filter("usb9", tmp_path) == 1


def test_default_route_device_takes_the_lowest_metric(tmp_path: Path) -> None:
    route = tmp_path / "route"
    route.write_text(
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n"
        "wlan0\t00000000\t011212C6\t0003\t0\t0\t600\t00000000\n"
        "eth0\t00000000\t010112C6\t0003\t0\t0\t100\t00000000\n"
        "eth0\t000112C6\t00000000\t0001\t0\t0\t0\t00FFFFFF\n"
    )
    assert default_route_device(route) == "eth0"
    assert default_route_device(tmp_path / "missing") is None
