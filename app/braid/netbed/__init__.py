"""The namespace test world: a laptop with several links, ISPs, an internet and a server.

Used by the tests, ``braid demo`` and the benchmarks. Needs root (CAP_NET_ADMIN and
CAP_SYS_ADMIN for namespaces); never changes the namespace of the machine it runs on.
"""

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
