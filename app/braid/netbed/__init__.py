"""The namespace test world: a laptop with several links, ISPs, an internet and a server.

Used by the tests, ``braid demo`` and the benchmarks. Needs root (CAP_NET_ADMIN and
CAP_SYS_ADMIN for namespaces); never changes the namespace of the machine it runs on.

The names below are imported on first use, so that the world's helper processes (``python -m
braid.netbed.wire`` and the like) do not pay for importing the world itself.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from braid.netbed.nsutil import NetbedError
    from braid.netbed.payload import expected_sha256
    from braid.netbed.world import (
        DEFAULT_LINKS,
        LinkSpec,
        World,
        close_all,
        python_argv,
        sweep_stale,
        unavailable_reason,
    )

_WHERE = {
    "NetbedError": "braid.netbed.nsutil",
    "expected_sha256": "braid.netbed.payload",
    "DEFAULT_LINKS": "braid.netbed.world",
    "LinkSpec": "braid.netbed.world",
    "World": "braid.netbed.world",
    "close_all": "braid.netbed.world",
    "python_argv": "braid.netbed.world",
    "sweep_stale": "braid.netbed.world",
    "unavailable_reason": "braid.netbed.world",
}

__all__ = [
    "DEFAULT_LINKS",
    "LinkSpec",
    "NetbedError",
    "World",
    "close_all",
    "expected_sha256",
    "python_argv",
    "sweep_stale",
    "unavailable_reason",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
