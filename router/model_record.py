"""What the router knows about one model: its spec, status, child, readiness and use."""

from __future__ import annotations

import asyncio
from typing import Any

from router.child_process import ChildProcess
from router.model_sources import ModelSpec
from router.model_status import ModelStatus


class ModelRecord:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.status = ModelStatus.UNLOADED
        self.exit_code: int | None = None
        self.child: ChildProcess | None = None
        self.port: int | None = None
        self.assigned_port: int | None = None  # picked by the router for a foreign child
        self.meta: dict[str, Any] = {}
        self.args: list[str] = []
        self.resolved_model_path: str | None = None
        self.in_flight = 0  # leases held: requests, and work already running (it keeps the model busy)
        self.limited_in_flight = 0  # of those, the requests its concurrency-limit counts
        self.last_used = 0.0
        self.loading_since = 0.0
        self.last_used_wall = 0.0  # time.time() of the last request, for people to read
        self.estimated_bytes: int | None = None  # admission's estimate, made when it was admitted
        self.rss_bytes: int | None = None  # its child's resident memory, sampled off the event loop
        self.lock = asyncio.Lock()
        # Settled when a load ends: None = ready, an int = the child exited with that code.
        self.ready: asyncio.Future[int | None] | None = None
        # Set while one request is getting this model admitted; others wait on it, not in the queue.
        self.admitting: asyncio.Future[None] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def failed(self) -> bool:
        return self.status == ModelStatus.UNLOADED and self.exit_code not in (None, 0)

    def to_json(self, created: int) -> dict[str, Any]:
        status: dict[str, Any] = {"value": str(self.status), "args": self.args or self.spec.child_args(),
                                  "preset": self.spec.preset_ini}
        if self.failed:
            status["failed"] = True
            status["exit_code"] = self.exit_code
        entry: dict[str, Any] = {
            "id": self.name, "aliases": list(self.spec.aliases), "tags": list(self.spec.tags),
            "object": "model", "owned_by": "modelyard", "created": created, "status": status,
            "source": self.spec.source,
        }
        if self.status.is_running and self.meta:
            entry["meta"] = self.meta
        entry["in_flight"] = self.in_flight
        entry["last_used"] = round(self.last_used_wall, 3) if self.last_used_wall else None
        if self.child is not None and self.rss_bytes is not None:
            entry["memory"] = {"rss_bytes": self.rss_bytes}
        return entry
