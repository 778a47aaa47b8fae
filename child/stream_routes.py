"""The child's resumable-stream routes (llama.cpp's names): replay, lookup, cancel."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from child.openai_http import NotAJsonObject, json_object
from child.openai_schema import RequestError
from child.protocol import CONVERSATION_HEADER, conversation_id_problem
from child.runtime import ChildRuntime
from child.stream_sessions import OffsetLost

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def conversation_id_of(request: Request) -> str | None:
    value = request.headers.get(CONVERSATION_HEADER)
    if value is None:
        return None
    value = value.strip()
    problem = conversation_id_problem(value)
    if problem:
        raise RequestError(problem)
    return value


def _offset(request: Request) -> int:
    raw = request.query_params.get("from")
    if raw is None or raw == "":
        return 0
    try:
        offset = int(raw)
    except ValueError as exc:
        raise RequestError(f"'from' must be a byte offset, not {raw!r}") from exc
    if offset < 0:
        raise RequestError("'from' must not be negative")
    return offset


def build_router(runtime: ChildRuntime) -> APIRouter:
    router = APIRouter()

    def conv_from_query(request: Request) -> str:
        conv_id = request.query_params.get("conv_id") or request.query_params.get("conversation_id")
        if not conv_id:
            raise RequestError("Missing conversation id (conv_id)")
        return conv_id

    async def replay(conv_id: str, request: Request) -> Response:
        offset = _offset(request)
        session = runtime.sessions.get(conv_id)
        if session is None:
            raise RequestError(f"no stream for conversation '{conv_id}'", 404, "not_found_error")
        try:
            session.check_offset(offset)
        except OffsetLost as exc:
            raise RequestError("Stream offset lost, please restart") from exc
        return StreamingResponse(session.follow(offset), media_type="text/event-stream", headers=SSE_HEADERS)

    @router.get("/v1/stream")
    async def replay_by_query(request: Request) -> Response:
        return await replay(conv_from_query(request), request)

    @router.get("/v1/stream/{conv_id}")
    async def replay_by_path(conv_id: str, request: Request) -> Response:
        return await replay(conv_id, request)

    @router.delete("/v1/stream")
    async def cancel_by_query(request: Request) -> Response:
        runtime.sessions.cancel(conv_from_query(request))
        return Response(status_code=204)

    @router.delete("/v1/stream/{conv_id}")
    async def cancel_by_path(conv_id: str) -> Response:
        runtime.sessions.cancel(conv_id)
        return Response(status_code=204)

    @router.post("/v1/streams/lookup")
    async def lookup(request: Request) -> list[dict[str, Any]]:
        try:
            body = json_object(await request.body())
        except NotAJsonObject as exc:
            raise RequestError(str(exc)) from exc
        ids = conversation_ids_of(body)
        return runtime.sessions.lookup(ids)

    return router


def conversation_ids_of(body: Any) -> list[str]:
    if not isinstance(body, dict) or not isinstance(body.get("conversation_ids"), list):
        raise RequestError("expected {\"conversation_ids\": [...]}")
    ids = body["conversation_ids"]
    if not all(isinstance(i, str) for i in ids):
        raise RequestError("conversation_ids must be strings")
    return list(ids)
