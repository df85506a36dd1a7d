"""Freed heap goes back to the system: what keeps braidd's resident size flat over days."""

from __future__ import annotations

import asyncio
import ctypes.util

import psutil
import pytest

from braid import memory


@pytest.mark.skipif(
    "libc" not in (ctypes.util.find_library("c") or ""), reason="needs a C library with malloc"
)
def test_trim_returns_freed_heap_to_the_system() -> None:
    process = psutil.Process()
    # Many mid-sized blocks from malloc's heap (below its mmap threshold), then free all but
    # every 64th: the survivors pin the heap's top, so only trimming can hand the holes back.
    blocks = [ctypes.create_string_buffer(8192) for _ in range(12000)]
    for block in blocks:
        ctypes.memset(block, 1, 8192)
    keep = blocks[::64]
    del blocks
    before = process.memory_info().rss
    assert memory.trim()
    after = process.memory_info().rss
    assert after < before - 30e6, (before, after)
    del keep


def test_periodic_trim_runs_until_cancelled(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(memory, "trim", lambda: calls.append(1) or True)

    async def main() -> None:
        task = asyncio.create_task(memory.trim_periodically(0.01))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert len(calls) >= 3
