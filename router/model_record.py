"""What the router knows about one model: its spec, status, upstream, readiness and use.

A record is one upstream of a model: a local child (spawned, admitted, evicted), a remote server
(`url =` in a preset) or a peer router's model (`name@peer`). Several records that serve the same
name are that model's replicas (Registry.choose picks one per request)."""

from __future__ import annotations

import asyncio
from typing import Any

from router.child_process import ChildProcess
from router.model_sources import SOURCE_PEER, SOURCE_REMOTE, ModelSpec
from router.model_status import ModelStatus
from router.upstream import Upstream


class ModelRecord:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.status = ModelStatus.UNLOADED
        self.exit_code: int | None = None
        self.child: ChildProcess | None = None
        self.upstream: Upstream | None = None  # where requests go; a local child's only while it serves
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
        # A remote server's or a peer's: why it does not serve now (failed check, peer gone).
        self.unreachable: str | None = None
        self.peer_entry: dict[str, Any] = {}  # a peer model's own /models entry, as the peer gave it

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def is_local(self) -> bool:
        """Its child runs here: admitted, counted in --models-max, evicted, unloaded when idle."""
        return self.spec.source not in (SOURCE_REMOTE, SOURCE_PEER)

    @property
    def served_name(self) -> str:
        """The name its replicas share: `name` of `name@where` (a peer's model, a remote section)."""
        return self.spec.served_name

    @property
    def routable(self) -> bool:
        """May a request be sent to it now? A local model is (it loads on demand); a remote one
        while its health checks pass; a peer's while the peer answers (the peer loads on demand)."""
        if self.is_local:
            return True
        return self.unreachable is None and (self.status.can_serve or self.spec.source == SOURCE_PEER)

    @property
    def failed(self) -> bool:
        return self.status == ModelStatus.UNLOADED and self.exit_code not in (None, 0)

    def to_json(self, created: int) -> dict[str, Any]:
        args = (self.args or self.spec.child_args()) if self.is_local else []
        status: dict[str, Any] = {"value": str(self.status), "args": args, "preset": self.spec.preset_ini}
        if self.failed:
            status["failed"] = True
            status["exit_code"] = self.exit_code
        if self.unreachable is not None:
            status["failed"] = True
            status["error"] = self.unreachable
        entry: dict[str, Any] = {
            **self.peer_entry,  # what the peer says of its model; the router's own fields win
            "id": self.name, "aliases": list(self.spec.aliases), "tags": list(self.spec.tags),
            "object": "model", "owned_by": "modelyard", "created": created, "status": status,
            "source": self.spec.source,
        }
        if self.spec.peer:
            entry["peer"] = self.spec.peer
        if self.spec.remote_url:
            entry["url"] = self.spec.remote_url
        if self.status.is_running and self.meta:
            entry["meta"] = self.meta
        entry["in_flight"] = self.in_flight
        entry["last_used"] = round(self.last_used_wall, 3) if self.last_used_wall else None
        if self.child is not None and self.rss_bytes is not None:
            entry["memory"] = {"rss_bytes": self.rss_bytes}
        return entry
