"""/models: list, load, unload, and the /models/sse status feed."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from router import model_facts
from router.errors import ConfigError, InvalidRequest, NotFound, Unavailable
from router.events import Subscription
from router.hf_cache import list_cached_models, remove_cached_model
from router.idle_reaper import ttl_of
from router.model_record import ModelRecord
from router.model_sources import SOURCE_CACHE, SOURCE_PEER, SOURCE_REMOTE, collect_specs
from router.model_status import ModelStatus
from router.remote_models import check_once
from router.routes import schemas
from router.routes.common import json_body, registry_of, required_model_field

router = APIRouter()


@router.get("/models")
@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    registry = registry_of(request)
    if request.query_params.get("reload") not in (None, "", "0", "false"):
        try:
            specs = await asyncio.to_thread(collect_specs, request.app.state.settings)
        except ConfigError as exc:
            raise InvalidRequest(f"reload failed, the running configuration is kept: {exc}") from exc
        await registry.reload(specs)
    # `unlisted` models (llama-swap's) are served by name but not shown.
    records = [r for r in registry.records.values() if not r.spec.unlisted]
    await model_facts.read_facts(path for r in records for path in model_facts.header_paths(r))
    created = int(time.time())
    return {"object": "list", "data": [model_facts.entry(r, created) for r in records]}


@router.post("/models/load", openapi_extra=schemas.MODEL_ONLY)
async def load_model(request: Request) -> dict[str, Any]:
    _, data = await json_body(request)
    name = data.get("model")
    if not isinstance(name, str) or not name:
        # llama.cpp looks the empty name up like any other: a 404, not a 400.
        raise NotFound("model name is missing from the request")
    await _each_replica(request, name, "load")
    return {"success": True}


async def _each_replica(request: Request, name: str, action: str) -> None:
    """Load or unload what `name` names: that model, or every replica of a name only replicas
    serve (`tiny` on two peers). A peer's model is loaded by its peer; a remote model's status is
    its health, which a load checks now and an unload cannot change."""
    registry = registry_of(request)
    record = registry.lookup(name)
    if record is None and registry.serves(name):
        targets = registry.replicas(name)
    elif record is None or record.is_local:
        await (registry.load(name) if action == "load" else registry.unload(name))
        return
    else:
        targets = [record]
    outcomes = await asyncio.gather(*(_one(request, target, action) for target in targets), return_exceptions=True)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if len(failures) == len(outcomes):
        raise failures[0]


async def _one(request: Request, record: ModelRecord, action: str) -> None:
    registry = registry_of(request)
    if record.spec.source == SOURCE_PEER:
        await request.app.state.peers.forward(record, action)
    elif record.spec.source == SOURCE_REMOTE:
        if action == "unload":
            raise InvalidRequest(f"model '{record.name}' is a remote server's ({record.spec.remote_url}): "
                                 "this router does not run it, so it cannot unload it")
        await check_once(registry, record)
        if record.unreachable is not None:
            raise Unavailable(f"model '{record.name}' is unreachable: {record.unreachable}")
    elif action == "load":
        await registry.load(record.name)
    else:
        await registry.unload(record.name)


@router.post("/models/unload", openapi_extra=schemas.MODEL_ONLY)
async def unload_model(request: Request) -> dict[str, Any]:
    """Stop a model; without a `model` field, every running model (as llama-swap's /unload)."""
    raw = await request.body()
    _, data = await json_body(request) if raw.strip() else (raw, {})
    if data == {}:  # nothing named at all; {"model": null} or {"name": ...} is a 400 below
        await registry_of(request).unload_all()
        return {"success": True}
    name = required_model_field(data, "model name is missing from the request")
    record = registry_of(request).lookup(name)
    if record is not None and record.status == ModelStatus.DOWNLOADING:
        await request.app.state.downloads.cancel(record.name)  # returns once no partial file is left
        return {"success": True}
    await _each_replica(request, name, "unload")
    return {"success": True}


@router.get("/unload")
async def unload_all_models(request: Request) -> PlainTextResponse:
    """llama-swap's: stop every running model."""
    await registry_of(request).unload_all()
    return PlainTextResponse("OK")


@router.get("/running")
async def running_models(request: Request) -> dict[str, Any]:
    """llama-swap's list of the models whose process runs ("ready"; "sleeping" while a child has
    released its weights; "starting" while it loads)."""
    registry = registry_of(request)
    states = {ModelStatus.LOADED: "ready", ModelStatus.SLEEPING: "sleeping", ModelStatus.LOADING: "starting"}
    running = []
    for record in registry.records.values():
        if record.status not in states or not record.is_local:
            continue  # a peer's or a remote server's processes are not this router's
        ttl = ttl_of(registry, record)
        running.append({
            "model": record.name, "state": states[record.status],
            "cmd": " ".join(record.child.argv) if record.child is not None else "",
            "proxy": f"http://{record.upstream.address}" if record.upstream is not None else "",
            "ttl": int(ttl) if ttl >= 0 else 0,
        })
    return {"running": running}


def _model_in_query(request: Request, missing_message: str) -> ModelRecord:
    name = request.query_params.get("model")
    if not name:
        raise InvalidRequest(missing_message)
    record = registry_of(request).lookup(name)
    if record is None:
        raise NotFound(f"model '{name}' not found")
    return record


@router.get("/models/logs")
async def model_logs(request: Request) -> EventSourceResponse:
    """SSE of one model's log lines: the recent ones kept in its ring, then live ones."""
    record = _model_in_query(request, "model name is missing from the request")
    registry = registry_of(request)
    subscription = registry.logs.live.subscribe()

    async def own_lines(message: dict[str, Any]) -> dict[str, Any] | None:
        return message["data"] if message["model"] == record.name else None

    return sse_feed(request, subscription, registry.logs.recent(record.name), select=own_lines)


@router.post("/models", openapi_extra=schemas.MODEL_ONLY)
async def download_model(request: Request) -> dict[str, Any]:
    """Start a Hugging Face download of `user/repo[:quant]`; progress comes on /models/sse."""
    _, data = await json_body(request)
    reference = required_model_field(data, "model must be a non-empty string")
    name = await request.app.state.downloads.start(reference)
    return {"success": True, "model": name}


@router.delete("/models")
async def remove_model(request: Request) -> dict[str, Any]:
    """Remove a downloaded (cached) model: stop it, delete its files, forget it."""
    record = _model_in_query(request, "model must be a non-empty string")  # llama.cpp's words here
    registry = registry_of(request)
    if record.status == ModelStatus.DOWNLOADING:
        # A preset model with hf-repo too: its download stops, the model stays (unloaded).
        await request.app.state.downloads.cancel(record.name)
        return {"success": True}
    if record.spec.source != SOURCE_CACHE:
        raise InvalidRequest(f"model '{record.name}' is not a downloaded model (source: {record.spec.source})")
    cached = next((m for m in await asyncio.to_thread(list_cached_models) if m.name == record.name), None)
    await registry.remove(record)
    if cached is not None:
        await asyncio.to_thread(remove_cached_model, cached)
    return {"success": True}


@router.get("/models/sse")
async def models_sse(request: Request) -> EventSourceResponse:
    registry = registry_of(request)
    subscription = registry.events.subscribe()
    # The snapshot is taken in the same step as the subscription, so no event falls between them.
    snapshot = []
    for record in registry.records.values():
        data: dict[str, Any] = {"status": str(record.status)}
        if record.failed:
            data["exit_code"] = record.exit_code
        if record.unreachable is not None:
            data["error"] = record.unreachable
        snapshot.append({"model": record.name, "event": "status_change", "data": data})

    async def as_llama_cpp(message: dict[str, Any]) -> dict[str, Any]:
        """A first `loaded` event's `info` is llama.cpp's: the model's entry with its meta."""
        info = message["data"].get("info")
        record = registry.lookup(message["model"])
        if message["event"] != "status_change" or not isinstance(info, dict) or record is None:
            return message
        await model_facts.read_facts(model_facts.header_paths(record))
        return {**message, "data": {**message["data"], "info": model_facts.loaded_info(record, info)}}

    return sse_feed(request, subscription, snapshot, select=as_llama_cpp)


async def _every(message: dict[str, Any]) -> dict[str, Any] | None:
    return message


def sse_feed(request: Request, subscription: Subscription, first: list[dict[str, Any]],
             select: Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]] = _every,
             ) -> EventSourceResponse:
    """An SSE response: `first` items, then each live message that `select` keeps (and may
    reshape), until dropped."""

    async def events() -> AsyncIterator[ServerSentEvent]:
        try:
            for initial in first:
                yield ServerSentEvent(json.dumps(initial))
            while True:
                message = await subscription.next()
                if message is None:
                    return
                kept = await select(message)
                if kept is not None:
                    yield ServerSentEvent(json.dumps(kept))
        finally:
            subscription.close()

    return EventSourceResponse(events(), ping=request.app.state.settings.sse_ping_interval_s)
