"""The child's OpenAI-compatible HTTP API on top of the scheduler."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from child import anthropic_messages, embedding_routes, native_completion, responses_api
from child.completions import answer, ensure_ready, on_model, plan_chat, plan_completion, render_chat
from child.engine.llama_model import BUILD_INFO
from child.metrics import metrics_registry
from child.openai_http import error_response
from child.openai_schema import (
    ChatCompletionBody,
    CompletionBody,
    DetokenizeBody,
    RequestError,
    TokenizeBody,
    parse_body,
)
from child.protocol import ChildState
from child.runtime import ChildRuntime
from child.serving import ClientDisconnected, fastapi_options
from child.stream_routes import build_router, conversation_id_of

log = logging.getLogger(__name__)

def create_app(runtime: ChildRuntime) -> FastAPI:
    app = FastAPI(title="modelyard child", docs_url=None, redoc_url=None, **fastapi_options())

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return error_response(exc.status, exc.message, exc.error_type, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(ClientDisconnected)
    async def _client_gone(_: Request, exc: ClientDisconnected) -> JSONResponse:
        return error_response(499, "the client disconnected")  # nobody reads it; logs do

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, str(exc.errors()[0].get("msg", "invalid request")))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, f"internal error: {type(exc).__name__}")

    @app.get("/health")
    async def health() -> Response:
        if runtime.scheduler is None:
            return error_response(503, "Loading model")
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    @app.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": runtime.settings.alias, "object": "model", "created": runtime.created,
            "owned_by": "modelyard", "meta": runtime.info}]}

    @app.get("/props")
    async def props() -> dict[str, Any]:
        settings = runtime.settings
        return {
            "role": "model",
            "model_alias": settings.alias,
            "model_path": settings.model_path,
            "total_slots": settings.context.n_parallel,
            "is_sleeping": runtime.state == ChildState.SLEEPING,
            "chat_template": runtime.template_source or "",
            "default_generation_settings": {
                "n_ctx": runtime.info.get("n_ctx_slot", 0),
                "params": {"temperature": settings.default_sampling.temperature,
                           "top_k": settings.default_sampling.top_k,
                           "top_p": settings.default_sampling.top_p,
                           "min_p": settings.default_sampling.min_p,
                           "n_predict": settings.default_max_tokens},
            },
            "modalities": {"vision": False, "audio": False},
            "build_info": BUILD_INFO,
        }

    metrics = metrics_registry(runtime)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    @app.get("/slots")
    async def slots() -> list[dict[str, Any]]:
        ensure_ready(runtime)
        scheduler = runtime.scheduler
        assert scheduler is not None
        # Read without the scheduler's lock: a snapshot that may be one step old.
        return [{"id": slot.seq_id, "is_processing": slot.request is not None,
                 "n_ctx": scheduler.n_ctx_slot, "n_cached": len(slot.cached)}
                for slot in scheduler.slots]

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        ensure_ready(runtime)
        with runtime.sessions.reserve(conversation_id_of(request)) as reservation:  # before the body is read
            body = parse_body(await request.body(), ChatCompletionBody)
            plan = await plan_chat(runtime, body)
            return await answer(runtime, body, plan, reservation, request)

    @app.post("/v1/completions")
    @app.post("/completions")
    async def completions(request: Request) -> Response:
        ensure_ready(runtime)
        with runtime.sessions.reserve(conversation_id_of(request)) as reservation:  # before the body is read
            body = parse_body(await request.body(), CompletionBody)
            plan = await plan_completion(runtime, body)
            return await answer(runtime, body, plan, reservation, request)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = parse_body(await request.body(), TokenizeBody)
        tokens = await on_model(runtime, lambda m: m.tokenize(body.content, body.add_special, parse_special=True))
        if not body.with_pieces:
            return {"tokens": tokens}
        pieces = await on_model(runtime, lambda m: [m.token_piece(t).decode("utf-8", errors="replace") for t in tokens])
        return {"tokens": [{"id": t, "piece": p} for t, p in zip(tokens, pieces, strict=True)]}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = parse_body(await request.body(), DetokenizeBody)
        if runtime.n_vocab is not None and any(t < 0 or t >= runtime.n_vocab for t in body.tokens):
            raise RequestError(f"token ids must be in 0..{runtime.n_vocab - 1}")
        data = await on_model(runtime, lambda m: b"".join(m.token_piece(t) for t in body.tokens))
        return {"content": data.decode("utf-8", errors="replace")}

    @app.post("/apply-template")
    async def apply_template(request: Request) -> dict[str, Any]:
        ensure_ready(runtime)
        body = parse_body(await request.body(), ChatCompletionBody)
        return {"prompt": render_chat(runtime, body)[0]}

    app.include_router(build_router(runtime))
    app.include_router(embedding_routes.build_router(runtime))
    app.include_router(native_completion.build_router(runtime))
    app.include_router(anthropic_messages.build_router(runtime))
    app.include_router(responses_api.build_router(runtime))
    return app
