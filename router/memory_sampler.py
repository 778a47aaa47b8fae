"""The children's resident memory, sampled in a worker thread for `/models` and admission.

psutil reads /proc for every process of a child's tree; done on the event loop for each running
model on every `GET /models` (the dashboard polls it), that is time every other request waits.
Here one task samples all running children once a second, off the loop, and the records keep the
figure.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from router.memory import tree_rss_bytes

if TYPE_CHECKING:
    from router.registry import Registry

SAMPLE_INTERVAL_S = 1.0


def _sample(pids: list[int]) -> list[int | None]:
    return [tree_rss_bytes(pid) for pid in pids]


async def sample_resident_memory(registry: Registry, interval_s: float = SAMPLE_INTERVAL_S) -> None:
    """Runs for the router's lifetime."""
    while True:
        running = [(record, record.child.pid) for record in registry.records.values()
                   if record.child is not None and record.child.pid is not None]
        figures = await asyncio.to_thread(_sample, [pid for _, pid in running]) if running else []
        for (record, pid), rss in zip(running, figures, strict=True):
            if record.child is not None and record.child.pid == pid:  # still the same child
                record.rss_bytes = rss
        await asyncio.sleep(interval_s)
