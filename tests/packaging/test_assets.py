"""braid.assets finds resources in a checkout and in a bundle; braid.__version__ is pyproject's."""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import pytest
from package_build import ROOT, project_version

import braid
from braid import assets


def test_assets_come_from_the_checkout() -> None:
    icon = assets.get_asset("icons", "hicolor", "scalable", "apps", "braid.svg")
    assert icon == ROOT / "resources" / "icons" / "hicolor" / "scalable" / "apps" / "braid.svg"
    assert assets.get_asset("braid-tray.desktop").read_text().startswith("[Desktop Entry]")


def test_assets_come_from_the_bundle_when_frozen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundled = tmp_path / "resources" / "icons" / "only-in-the-bundle.svg"
    bundled.parent.mkdir(parents=True)
    bundled.write_text("<svg/>")
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "_MEIPASS", str(tmp_path), raising=False)
    assert assets.resource_roots()[0] == tmp_path / "resources"
    assert assets.get_asset("icons", "only-in-the-bundle.svg") == bundled
    # the checkout's resources are not looked at from a bundle
    assert assets.find_asset("braid-tray.desktop") in (
        None,
        assets.SYSTEM_DIR / "braid-tray.desktop",
    )


def test_a_missing_asset_says_where_it_looked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets, "SYSTEM_DIR", Path("/nonexistent/braid"))
    assert assets.find_asset("no-such-file.png") is None
    with pytest.raises(
        FileNotFoundError, match=r"no-such-file\.png.*resources.*/nonexistent/braid"
    ):
        assets.get_asset("no-such-file.png")


def test_the_version_is_pyprojects() -> None:
    assert braid.__version__ == project_version()


def test_without_installed_metadata_the_version_is_read_from_pyproject(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    braid._version.cache_clear()
    try:
        assert braid._version() == project_version()
    finally:
        braid._version.cache_clear()
