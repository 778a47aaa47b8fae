"""Admission: may one more child start, and whom to evict so that it can.

Two limits: --models-max resident children, and memory (the model's estimated size must fit in
what psutil reports as available, less a reserve; or, with --models-memory-mb, in that budget less
what the resident children are estimated to take: psutil sees the host inside a container, and a
fixed budget gives the same answer on every run). To make room, the least recently used idle
model is stopped; pinned models and models with a request in flight are never evicted. When
every candidate is busy, the load waits (in FIFO order: the admission lock is fair) and drains the
least recently used one: it finishes its requests but takes no new ones, so the wait is bounded
even under constant traffic. When nothing could ever make it fit, it is refused at once with the
numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from router.bundled_models import PACKAGE_PREFIX, resolve_package_model
from router.errors import ConfigError, Unavailable
from router.memory import MIB, available_bytes, estimate_model_bytes
from router.model_sources import ModelSpec
from router.settings import RouterSettings

if TYPE_CHECKING:
    from router.model_record import ModelRecord
    from router.registry import Registry

log = logging.getLogger(__name__)


DEFAULT_CTX = 4096  # the child's default -c


def context_of(spec: ModelSpec) -> int:
    try:
        return int(str(spec.options.get("ctx-size", DEFAULT_CTX)))
    except ValueError:
        return DEFAULT_CTX


class Admission:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.settings = registry.settings
        self._lock = asyncio.Lock()  # FIFO: asyncio.Lock wakes waiters in arrival order
        self.queued = 0  # loads holding or waiting for a turn
        self.drained: ModelRecord | None = None  # the busy model the current turn closed to new requests

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """One load's turn: waits in FIFO order (503 beyond --models-queue) and holds the turn
        while the caller makes room and spawns, so two loads never both take the last place."""
        if self.queued >= self.settings.models_queue:
            raise Unavailable(f"{self.queued} loads are already waiting for room (--models-queue)",
                              headers={"Retry-After": "1"})
        self.queued += 1
        try:
            async with self._lock:
                yield
        finally:
            self.queued -= 1

    @staticmethod
    def estimate_bytes(spec: ModelSpec, model_path: str) -> int | None:
        """Reads the model's GGUF header the first time: blocking, run it off the event loop."""
        if not model_path or model_path.startswith(PACKAGE_PREFIX):
            return None
        return estimate_model_bytes(model_path, context_of(spec))

    async def room_bytes(self, running: list[ModelRecord], reserve: int) -> int:
        budget = int(self.settings.models_memory_mb * MIB)
        if budget > 0:
            return budget - sum(r.estimated_bytes or 0 for r in running)
        return await asyncio.to_thread(available_bytes) - reserve

    def describe_limit(self) -> str:
        if self.settings.models_memory_mb > 0:
            return f"--models-memory-mb {self.settings.models_memory_mb:.0f}"
        return f"available memory less the {self.settings.memory_reserve_mb:.0f} MiB reserve"

    def resident_bytes(self, record: ModelRecord) -> int:
        """What stopping this model would give back: its sampled RSS, else its estimate."""
        if self.settings.models_memory_mb > 0:
            return record.estimated_bytes or 0  # the budget counts estimates, so must this
        return record.rss_bytes or record.estimated_bytes or 0

    async def make_room(self, target: ModelRecord, need: int | None) -> None:
        """Evict (or wait) until `target`, estimated at `need` bytes (None: unknown), fits."""
        try:
            await self._make_room(target, need)
        finally:
            self._stop_draining()  # whatever happened, no model stays closed to new requests

    async def _make_room(self, target: ModelRecord, need: int | None) -> None:
        limit = self.settings.models_max
        reserve = int(self.settings.memory_reserve_mb * MIB)
        target.estimated_bytes = need
        records = self.registry.records.values()
        announced_wait = False
        while True:
            # Only this machine's children take its room (a peer's or a remote model is elsewhere).
            running = [r for r in records if r.is_local and r.status.is_running and r is not target]
            too_many = limit > 0 and len(running) >= limit
            room = await self.room_bytes(running, reserve) if need is not None else 0
            shortfall = need - room if need is not None else 0
            if not too_many and shortfall <= 0:
                return
            evictable = [r for r in running if not r.spec.pinned]
            if too_many and not evictable:
                raise Unavailable(f"cannot load '{target.name}': all {len(running)} resident models are pinned "
                                  f"(--models-max {limit})")
            if shortfall > 0:
                could_free = sum(self.resident_bytes(r) for r in evictable)
                if shortfall > could_free:
                    raise Unavailable(
                        f"cannot load '{target.name}': it needs about {need // MIB} MiB, "  # type: ignore[operator]
                        f"{room // MIB} MiB are free for it ({self.describe_limit()}), "
                        f"and evicting every idle unpinned model would free only {could_free // MIB} MiB",
                        headers={"Retry-After": "10"})
            idle = [r for r in evictable if r.in_flight == 0 and r.status.can_serve]
            if idle:
                victim = min(idle, key=lambda r: r.last_used)
                why = "--models-max" if too_many else "memory"
                log.info("evicting %s (least recently used, %s) to make room for %s", victim.name, why, target.name)
                self.registry.evictions_total += 1
                await self.registry.evict(victim)
                self._stop_draining()
                continue
            # Every candidate is busy or still loading. Drain the least recently used serving one:
            # it finishes what it has but takes nothing new, so it becomes idle in bounded time.
            serving = [r for r in evictable if r.status.can_serve]
            if serving and self.drained is None:
                drained = self.drained = min(serving, key=lambda r: r.last_used)
                log.info("load of %s waits for room: draining %s (%d requests in flight)", target.name,
                         drained.name, drained.in_flight)
            elif not announced_wait:
                log.info("load of %s waits for room: every resident model is busy", target.name)
            announced_wait = True
            await self.registry.room_changed()

    def _stop_draining(self) -> None:
        drained, self.drained = self.drained, None
        if drained is not None:
            self.registry.notify_room()


def check_startup_fit(settings: RouterSettings, specs: list[ModelSpec]) -> None:
    """Refuse to start when the load-on-startup models cannot all be resident at once."""
    eager = [s for s in specs if s.load_on_startup]
    if settings.models_max > 0 and len(eager) > settings.models_max:
        raise ConfigError(f"{len(eager)} models have load-on-startup ({', '.join(s.name for s in eager)}) but "
                          f"--models-max is {settings.models_max}: raise it or start fewer models")
    need = 0
    for spec in eager:
        path = spec.model_value
        if path.startswith(PACKAGE_PREFIX) and "/" in path:
            path = resolve_package_model(path)  # a file inside a package: no assembly needed
        need += estimate_model_bytes(path, context_of(spec)) or 0
    if settings.models_memory_mb > 0:
        room = int(settings.models_memory_mb * MIB)
        where = f"--models-memory-mb is {settings.models_memory_mb:.0f}"
    else:
        room = available_bytes() - int(settings.memory_reserve_mb * MIB)
        where = f"only {max(room, 0) // MIB} MiB are available after the {settings.memory_reserve_mb:.0f} MiB reserve"
    if eager and need > room:
        raise ConfigError(f"the load-on-startup models need about {need // MIB} MiB together, but {where}: "
                          "start fewer models at once, or give them more memory")
