"""Braid: bonds a laptop's links over Multipath TCP to the user's own server."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def _version() -> str:
    """The installed distribution's version; from a bare source tree, pyproject's."""
    from importlib import metadata

    try:
        return metadata.version("braid")
    except metadata.PackageNotFoundError:
        pass
    import tomllib

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        return tomllib.loads(pyproject.read_text())["project"]["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "0+unknown"


def __getattr__(name: str) -> str:
    # Looked up when first asked for: `import braid` stays free of the metadata scan.
    if name == "__version__":
        return _version()
    raise AttributeError(f"module 'braid' has no attribute {name!r}")
