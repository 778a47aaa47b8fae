"""Resumable-stream routes, routed to the child that owns each conversation.

Answers as llama.cpp's router does: its error texts, and lookup entries with whole-second times
and `completed_at: 0` while a stream is live.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from fastapi import APIRouter, Request, Response

from router.conversations import ConversationMap
from router.errors import InvalidRequest, NotFound, Unavailable, UpstreamFailed
from router.model_record import ModelRecord
from router.model_status import ModelStatus
from router.proxy import relay, target_of
from router.routes import schemas
from router.routes.common import json_body, registry_of

router = APIRouter()

MISSING_ID = "Missing conversation id in path"
NOT_FOUND = "Stream not found or expired"
BAD_OFFSET = "Invalid 'from' offset"


def conversations_of(request: Request) -> ConversationMap:
    conversations: ConversationMap = request.app.state.conversations
    return conversations


def _owner(request: Request, conv_id: str) -> ModelRecord | None:
    name = conversations_of(request).owner(conv_id)
    return registry_of(request).lookup(name) if name else None


def _conv_from_query(request: Request) -> str:
    conv_id = request.query_params.get("conv_id") or request.query_params.get("conversation_id")
    if not conv_id:
        raise InvalidRequest(MISSING_ID)
    return conv_id


def _check_offset(request: Request) -> None:
    """`from` is a byte offset; empty or absent is 0 (llama.cpp reads it with std::stoull, which
    also takes "12abc", "1.5" or "-1": modelyard refuses those with the same answer as "abc")."""
    offset = request.query_params.get("from", "")
    if offset and not (offset.isascii() and offset.isdigit()):
        raise InvalidRequest(BAD_OFFSET)


async def _replay(request: Request, conv_id: str) -> Response:
    record = _owner(request, conv_id)
    if record is None or record.status == ModelStatus.UNLOADED:
        raise NotFound(NOT_FOUND)
    _check_offset(request)
    if record.status == ModelStatus.LOADING:
        raise Unavailable("Stream owner model is loading, retry later", headers={"Retry-After": "1"})
    lease = registry_of(request).hold(record)
    return await relay(request.app.state.http, lease, "GET", target_of(request.scope), request.scope["headers"],
                       b"", (request.scope, request.receive))


async def _cancel(request: Request, conv_id: str) -> Response:
    if conversations_of(request).cancel_waiting(conv_id):  # its requests still waiting for the model
        # They give up at their next step, putting the conversation back to its owner before them
        # (a stream that may still run there): one turn of the loop, then the owner is read.
        await asyncio.sleep(0)
    record = _owner(request, conv_id)
    if record is not None and record.status.can_serve:
        lease = registry_of(request).hold(record)
        with contextlib.suppress(UpstreamFailed):  # a child that died has no stream left to stop
            await relay(request.app.state.http, lease, "DELETE", target_of(request.scope), request.scope["headers"],
                        b"", whole=True)
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
    """Only the asked ids; asks each owning child about its own ids and merges the answers.
    Whatever the body, the answer is a list (llama.cpp's router answers [] to a body it cannot use)."""
    try:
        _, data = await json_body(request)
    except InvalidRequest:
        return []
    ids = data.get("conversation_ids")
    if not isinstance(ids, list):
        return []
    by_model: dict[str, tuple[ModelRecord, list[str]]] = {}
    for conv_id in (i for i in ids if isinstance(i, str) and i):
        record = _owner(request, conv_id)
        if record is not None and record.status.can_serve:
            by_model.setdefault(record.name, (record, []))[1].append(conv_id)
    merged: list[dict[str, Any]] = []
    for record, model_ids in by_model.values():
        body = json.dumps({"conversation_ids": model_ids}).encode()
        try:
            response = await relay(request.app.state.http, registry_of(request).hold(record), "POST",
                                   "/v1/streams/lookup", [(b"content-type", b"application/json")], body,
                                   whole=True)
        except UpstreamFailed:
            continue  # a child that died knows no streams any more
        if response.status_code == 200:
            merged.extend(_as_llama_cpp(entry) for entry in _entries(bytes(response.body)))
    return merged


def _entries(body: bytes) -> list[dict[str, Any]]:
    """A child's lookup answer; whatever a `bin` or `cmd` child answers that is not a list of
    objects counts as nothing found."""
    try:
        found = json.loads(body)
    except ValueError:
        return []
    return [entry for entry in found if isinstance(entry, dict)] if isinstance(found, list) else []


def _as_llama_cpp(entry: dict[str, Any]) -> dict[str, Any]:
    """Unix seconds as integers, and 0 for `completed_at` while the stream is live."""
    shaped = dict(entry)
    for key in ("started_at", "completed_at"):
        value = shaped.get(key)
        shaped[key] = int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0
    return shaped
