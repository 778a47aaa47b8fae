"""Resumable-stream routes, routed to the child that owns each conversation."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request, Response

from router.conversations import ConversationMap
from router.errors import InvalidRequest, NotFound, Unavailable
from router.model_record import ModelRecord
from router.model_status import ModelStatus
from router.proxy import relay, target_of
from router.routes import schemas
from router.routes.common import json_body, lease_for, registry_of

router = APIRouter()


def conversations_of(request: Request) -> ConversationMap:
    conversations: ConversationMap = request.app.state.conversations
    return conversations


def _owner(request: Request, conv_id: str) -> ModelRecord | None:
    name = conversations_of(request).owner(conv_id)
    return registry_of(request).lookup(name) if name else None


def _conv_from_query(request: Request) -> str:
    conv_id = request.query_params.get("conv_id") or request.query_params.get("conversation_id")
    if not conv_id:
        raise InvalidRequest("Missing conversation id (conv_id)")
    return conv_id


async def _replay(request: Request, conv_id: str) -> Response:
    record = _owner(request, conv_id)
    if record is None or record.status == ModelStatus.UNLOADED:
        raise NotFound(f"no stream for conversation '{conv_id}'")
    if record.status == ModelStatus.LOADING:
        raise Unavailable("Stream owner model is loading, retry later", headers={"Retry-After": "1"})
    lease = await lease_for(request.scope, request.receive, record.name, autoload=False)
    return await relay(request.app.state.http, lease, "GET", target_of(request.scope), request.scope["headers"],
                       b"", (request.scope, request.receive))


async def _cancel(request: Request, conv_id: str) -> Response:
    record = _owner(request, conv_id)
    if record is not None and record.status.can_serve:
        lease = await lease_for(request.scope, request.receive, record.name, autoload=False)
        await relay(request.app.state.http, lease, "DELETE", target_of(request.scope), request.scope["headers"],
                    b"")
    return Response(status_code=204)


@router.get("/v1/stream")
async def replay_by_query(request: Request) -> Response:
    return await _replay(request, _conv_from_query(request))


@router.get("/v1/stream/{conv_id}")
async def replay_by_path(request: Request, conv_id: str) -> Response:
    return await _replay(request, conv_id)


@router.delete("/v1/stream")
async def cancel_by_query(request: Request) -> Response:
    return await _cancel(request, _conv_from_query(request))


@router.delete("/v1/stream/{conv_id}")
async def cancel_by_path(request: Request, conv_id: str) -> Response:
    return await _cancel(request, conv_id)


@router.post("/v1/streams/lookup", openapi_extra=schemas.LOOKUP)
async def lookup(request: Request) -> list[dict[str, Any]]:
    """Only the asked ids; asks each owning child about its own ids and merges the answers."""
    _, data = await json_body(request)
    ids = data.get("conversation_ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise InvalidRequest("expected {\"conversation_ids\": [...]} with string ids")
    by_model: dict[str, list[str]] = {}
    for conv_id in ids:
        record = _owner(request, conv_id)
        if record is not None and record.status.can_serve:
            by_model.setdefault(record.name, []).append(conv_id)
    merged: list[dict[str, Any]] = []
    for name, model_ids in by_model.items():
        lease = await lease_for(request.scope, request.receive, name, autoload=False)
        body = json.dumps({"conversation_ids": model_ids}).encode()
        response = await relay(request.app.state.http, lease, "POST", "/v1/streams/lookup",
                               [(b"content-type", b"application/json")], body)
        if response.status_code == 200:
            merged.extend(json.loads(bytes(response.body)))
    return merged
