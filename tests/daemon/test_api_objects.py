"""braidd's status and link objects, and the tray tests' stand-in braidd, match the declarations
in braid.protocol.api. No root: braidd runs on the recording fake platform."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from fake_platform import FakePlatform, Made

from braid.daemon.links.model import Link, Priority
from braid.daemon.reconciler import Parts
from braid.daemon.service import Daemon, DaemonConfig
from braid.protocol import api

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gui"))
from fake_braidd import FakeBraidd, make_link


def test_braidd_status_and_links_conform(tmp_path: Path) -> None:
    async def scenario() -> None:
        platform = FakePlatform()
        platform.device("eth0", 2, "198.18.1.2")
        platform.kinds = {"eth0": ("ethernet", False)}
        made = Made()
        config = DaemonConfig(state_dir=tmp_path, control_path=tmp_path / "control.sock")
        daemon = Daemon(config, Parts(made.pool, made.prober), platform=platform)
        daemon.store.load()
        daemon.settings.load()
        await daemon.reconciler.reconcile()
        assert api.problems(daemon.status()) == []
        assert api.problems(daemon.status(brief=True), brief=True) == []
        assert daemon.status()["links"][0]["name"] == "eth0"

    asyncio.run(scenario())


def test_a_link_object_conforms() -> None:
    link = Link(name="eth0", kind="ethernet", priority=Priority.ALWAYS, order=0, slot=0)
    assert set(link.to_json()) == api.keys(api.LinkObject)


def test_the_stand_in_braidd_conforms(tmp_path: Path) -> None:
    fake = FakeBraidd(tmp_path / "control.sock")
    assert api.problems(fake.status()) == []
    assert api.problems(fake.status(brief=True), brief=True) == []
    assert set(make_link("eth0", "ethernet", 0)) == api.keys(api.LinkObject)
