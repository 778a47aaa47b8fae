"""Idle unload: a model with no request for its TTL is stopped (Ollama's keep_alive).

The TTL is the model's preset `ttl`, else --models-ttl; a negative TTL means never. llama.cpp's
router only has sleep (the child keeps running with its weights released); this frees the whole
process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.model_record import ModelRecord
    from router.registry import Registry

log = logging.getLogger(__name__)

MAX_CHECK_INTERVAL_S = 1.0
MIN_CHECK_INTERVAL_S = 0.05


def ttl_of(registry: Registry, record: ModelRecord) -> float:
    return record.spec.ttl_s if record.spec.ttl_s is not None else registry.settings.models_ttl_s


async def reap_idle_models(registry: Registry) -> None:
    """Runs for the router's lifetime."""
    while True:
        ttls = [ttl_of(registry, r) for r in registry.records.values()]
        active = [t for t in ttls if t >= 0]
        interval = min(MAX_CHECK_INTERVAL_S, max(MIN_CHECK_INTERVAL_S, min(active) / 4)) if active else 1.0
        await asyncio.sleep(interval)
        now = time.monotonic()
        for record in list(registry.records.values()):
            ttl = ttl_of(registry, record)
            if ttl < 0 or record.in_flight or not record.status.can_serve or not record.is_local:
                continue
            idle_s = now - record.last_used
            if idle_s >= ttl:
                log.info("model %s idle for %.1f s (ttl %.1f s): unloading", record.name, idle_s, ttl)
                try:
                    await registry.evict(record)
                except Exception:  # noqa: BLE001 - the reaper must outlive one failed stop
                    log.exception("idle unload of %s failed", record.name)
