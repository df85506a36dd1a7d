"""braid.gui.client: the tray's connection to braidd, against a fake daemon on a real socket."""

from __future__ import annotations

from pathlib import Path

from fake_braidd import FakeBraidd

from braid.gui.client import DaemonClient


def test_subscribes_on_connect_and_passes_samples_and_events(qtbot, daemon, client) -> None:
    qtbot.waitUntil(lambda: daemon.subscribers == 1, timeout=3000)
    assert [r["cmd"] for r in daemon.commands()][:1] == ["subscribe"]
    with qtbot.waitSignal(client.sample, timeout=3000) as sample:
        daemon.push_sample({"eth0": (8e6, 1e6)})
    link = sample.args[0]["links"][0]
    assert (link["name"], link["rx_bps"]) == ("eth0", 8000000)
    with qtbot.waitSignal(client.event, timeout=3000) as event:
        daemon.push_event("link-lost", "wlan0", "wlan0 stopped answering")
    assert event.args[0]["event"] == "link-lost"


def test_requests_get_their_replies(qtbot, daemon, client, ask) -> None:
    ok, link = ask(client, "set_link", "usb0", priority="backup")
    assert ok and link["priority"] == "backup"
    request = daemon.commands("set-link")[-1]
    assert {k: v for k, v in request.items() if k != "id"} == {
        "cmd": "set-link",
        "link": "usb0",
        "priority": "backup",
    }
    ok, links = ask(client, "set_order", ["usb0", "eth0", "wlan0"])
    assert ok and [link["name"] for link in links] == ["usb0", "eth0", "wlan0"]
    # A change is followed by a fresh status, so every view shows it at once.
    with qtbot.waitSignal(client.status, timeout=3000) as status:
        client.set_link("eth0", metered=True)
    assert [link["name"] for link in status.args[0]["links"]] == ["usb0", "eth0", "wlan0"]


def test_daemon_not_running_says_how_to_start_it(qtbot, socket_dir: Path) -> None:
    client = DaemonClient(str(socket_dir / "absent.sock"), retry_delays=(0.05,))
    with qtbot.waitSignal(client.disconnected, timeout=3000) as lost:
        client.start()
    assert "not running" in lost.args[0]
    assert "sudo systemctl start braidd" in lost.args[0]
    with qtbot.waitSignal(client.reply, timeout=3000) as reply:
        client.up()
    assert reply.args[1] is False
    assert "sudo systemctl start braidd" in reply.args[2]["message"]
    client.stop()


def test_forbidden_says_how_to_join_the_group(qtbot, daemon, client) -> None:
    daemon.forbidden = {"down"}
    with qtbot.waitSignal(client.error, timeout=3000) as error:
        client.down()
    code, message = error.args
    assert code == "forbidden"
    assert "not in the braid group" in message
    assert "sudo usermod -aG braid $USER" in message


def test_reconnects_after_a_daemon_restart(qtbot, daemon: FakeBraidd, client) -> None:
    with qtbot.waitSignal(client.disconnected, timeout=3000) as lost:
        daemon.stop()
    assert "stopped" in lost.args[0] and "systemctl" in lost.args[0]
    assert not client.is_connected
    with qtbot.waitSignal(client.status, timeout=5000):
        daemon.start()
    assert client.is_connected
    qtbot.waitUntil(lambda: daemon.subscribers == 1, timeout=3000)


def test_a_silent_daemon_is_noticed(qtbot, daemon, socket_dir: Path) -> None:
    client = DaemonClient(str(daemon.path), retry_delays=(0.05,), stall_after=1.0)
    with qtbot.waitSignal(client.status, timeout=3000):
        client.start()
    # No sample comes (the fake pushes none by itself): after a second it counts as hung.
    with qtbot.waitSignal(client.disconnected, timeout=4000) as lost:
        pass
    assert "stopped answering" in lost.args[0]
    client.stop()
