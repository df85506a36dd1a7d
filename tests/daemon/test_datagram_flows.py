"""Which path braidd gives a UDP flow, and when it moves to a tunnel connection (no network)."""

from __future__ import annotations

import asyncio

from braid.daemon.tunnel.datagram import DatagramFlows, DatagramPath, parse_ports
from braid.protocol.address import Address

SETTINGS = {"udp_realtime": "redundant", "udp_other": "fastest", "realtime_ports": ["5004"]}


class TunnelSessions:
    """Records what would ride tunnel connections (UdpSessions' interface)."""

    def __init__(self, take_tunnel=None, answer=None) -> None:
        self.sent: list[tuple] = []
        self.answer = answer

    def start(self) -> None:
        pass

    def send(self, client, destination, data, dscp=None) -> None:
        self.sent.append((client, destination, data))

    async def close(self) -> None:
        pass


def path_without_server() -> DatagramPath:
    async def no_tunnel():
        raise AssertionError("no tunnel is taken without a server")

    return DatagramPath(no_tunnel, lambda: None, lambda: [])


def test_without_a_session_flows_take_tunnel_connections() -> None:
    async def scenario():
        path = path_without_server()
        path.start()
        made = []

        def sessions(take, answer):
            made.append(TunnelSessions(take, answer))
            return made[-1]

        flows = DatagramFlows(path, None, lambda *a: None, SETTINGS.__getitem__, sessions)
        flows.start()
        flows.send(("198.18.1.2", 4000), Address("198.19.0.1", 3478), b"x")
        made[0].answer(("198.18.1.2", 4000), Address("198.19.0.1", 3478), b"back")
        status = path.status()
        await flows.close()
        await path.close()
        return made[0].sent, status

    sent, status = asyncio.run(scenario())
    assert len(sent) == 1
    (flow,) = status["flows"]
    assert flow["path"] == "tunnel" and flow["class"] == "realtime" and flow["links"] == []
    assert (flow["datagrams_up"], flow["datagrams_down"]) == (1, 1)


def test_a_flow_of_class_tunnel_stays_on_tunnel_connections() -> None:
    async def scenario():
        path = path_without_server()
        path.start()
        path._sealer = object()  # a session, as far as the choice of path goes
        tunnels = TunnelSessions()
        settings = {**SETTINGS, "udp_other": "tunnel"}
        flows = DatagramFlows(path, None, lambda *a: None, settings.__getitem__, lambda *a: tunnels)
        flows.send(("198.18.1.2", 4000), Address("198.19.0.1", 9), b"x")
        flows.send(("198.18.1.2", 4000), Address("198.19.0.1", 9), b"y")
        status = path.status()
        path._sealer = None
        await path.close()
        return tunnels.sent, status

    sent, status = asyncio.run(scenario())
    assert [d for _, _, d in sent] == [b"x", b"y"]
    assert status["flows"][0]["path"] == "tunnel" and status["flows"][0]["mode"] == "tunnel"


def flows_on_the_tunnel_path() -> tuple[DatagramPath, DatagramFlows, list[int]]:
    """Started flows without a datagram session; the list grows each time a call begins (braidd
    then runs a pass, which holds the call's link)."""
    path = path_without_server()
    path.start()
    flows = DatagramFlows(
        path, None, lambda *a: None, SETTINGS.__getitem__, lambda take, answer: TunnelSessions()
    )
    flows.start()
    began: list[int] = []
    path.on_realtime = lambda: began.append(1)
    return path, flows, began


def test_user_listed_ports() -> None:
    assert parse_ports(["5004", "10000-10002", "nonsense", "9-3", "70000"]) == {
        5004,
        10000,
        10001,
        10002,
    }


def test_a_call_on_the_tunnel_path_counts_on_the_tunnels_link_for_headroom() -> None:
    """A call without a datagram session (UDP blocked, or class ``tunnel``) still asks for
    headroom, on the link its tunnel starts on; other UDP, and a call gone quiet, does not."""

    async def scenario():
        path, flows, began = flows_on_the_tunnel_path()
        flows.send(("198.18.1.2", 4000), Address("198.19.0.1", 3478), b"x")  # STUN: a call
        flows.send(("198.18.1.2", 4000), Address("198.19.0.1", 3478), b"x")
        flows.send(("198.18.1.2", 4001), Address("198.19.0.1", 53), b"y" * 40)  # DNS: not
        calls = path.realtime_links("eth0"), path.realtime_links(None)
        for flow in path.flows.values():
            flow.last -= 10.0  # the call went quiet
        quiet = path.realtime_links("eth0")
        await flows.close()
        await path.close()
        return calls, quiet, began

    (calls, without_best), quiet, began = asyncio.run(scenario())
    assert calls == {"eth0"} and without_best == set() and quiet == set()
    assert began == [1]  # once, when the call began


def test_a_flow_that_carries_stun_is_a_call_from_its_first_datagram() -> None:
    """WebRTC checks connectivity with STUN on the call's own addresses before its media, on
    any port: the flow is real-time (and asks for headroom) from that first check, and a flow
    that starts as something else turns real-time at its first STUN message."""
    from test_flowclass import stun_binding_request

    async def scenario():
        path, flows, began = flows_on_the_tunnel_path()
        check = stun_binding_request()
        flows.send(("198.18.1.2", 4000), Address("198.19.0.1", 40000), check)
        first = len(began)
        flows.send(("198.18.1.2", 4002), Address("198.19.0.1", 40002), b"z" * 1200)
        after_other = len(began)
        flows.send(("198.18.1.2", 4002), Address("198.19.0.1", 40002), check)
        classes = {f.destination.port: f.klass for f in path.flows.values()}
        await flows.close()
        await path.close()
        return first, after_other, began, classes

    first, after_other, began, classes = asyncio.run(scenario())
    assert first == 1 and after_other == 1 and began == [1, 1]
    assert classes == {40000: "realtime", 40002: "realtime"}
