"""The child's OpenAI-compatible HTTP API on top of the scheduler."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from child.engine.chat_template import ChatTemplateError
from child.engine.llama_model import BUILD_INFO, LlamaModel
from child.engine.requests import Delta, Done, Failed
from child.engine.scheduler import EngineStopped
from child.generation import Generation
from child.metrics import metrics_registry
from child.openai_http import error_body
from child.openai_schema import (
    ChatCompletionBody,
    CompletionBody,
    DetokenizeBody,
    GenerationBody,
    RequestError,
    TokenizeBody,
    parse_body,
)
from child.protocol import ChildState
from child.runtime import ChildRuntime
from child.serving import ClientDisconnected, cancelled_if_client_leaves, fastapi_options
from child.stream_routes import SSE_HEADERS, build_router, conversation_id_of

log = logging.getLogger(__name__)

def error_response(status: int, message: str, error_type: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, error_type), status_code=status, headers=headers)


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def usage_of(done: Done) -> dict[str, Any]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}


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

    def require_ready() -> None:
        if runtime.scheduler is None:
            raise RequestError("Loading model", 503, "unavailable_error")

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
        require_ready()
        scheduler = runtime.scheduler
        assert scheduler is not None
        # Read without the scheduler's lock: a snapshot that may be one step old.
        return [{"id": slot.seq_id, "is_processing": slot.request is not None,
                 "n_ctx": scheduler.n_ctx_slot, "n_cached": len(slot.cached)}
                for slot in scheduler.slots]

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        require_ready()
        body = parse_body(await request.body(), ChatCompletionBody)
        if runtime.template is None:
            raise RequestError("this model has no chat template: use /v1/completions, or start it with "
                               "--chat-template NAME")
        try:
            prompt = runtime.template.render(body.template_messages())
        except ChatTemplateError as exc:
            raise RequestError(str(exc)) from exc
        # The template writes BOS itself when the model wants one.
        return await _generate(runtime, body, prompt, add_special=False, chat=True,
                               conversation_id=conversation_id_of(request), client=request)

    @app.post("/v1/completions")
    @app.post("/completions")
    async def completions(request: Request) -> Response:
        require_ready()
        body = parse_body(await request.body(), CompletionBody)
        return await _generate(runtime, body, body.prompt_value(), add_special=True, chat=False,
                               conversation_id=conversation_id_of(request), client=request)

    async def on_model(work: Callable[[LlamaModel], Any]) -> Any:
        require_ready()
        assert runtime.scheduler is not None
        try:
            return await asyncio.wrap_future(runtime.scheduler.call(work))
        except EngineStopped as exc:
            raise RequestError(str(exc), 503, "unavailable_error") from exc

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = parse_body(await request.body(), TokenizeBody)
        tokens = await on_model(lambda m: m.tokenize(body.content, body.add_special, parse_special=True))
        if not body.with_pieces:
            return {"tokens": tokens}
        pieces = await on_model(lambda m: [m.token_piece(t).decode("utf-8", errors="replace") for t in tokens])
        return {"tokens": [{"id": t, "piece": p} for t, p in zip(tokens, pieces, strict=True)]}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = parse_body(await request.body(), DetokenizeBody)
        if runtime.n_vocab is not None and any(t < 0 or t >= runtime.n_vocab for t in body.tokens):
            raise RequestError(f"token ids must be in 0..{runtime.n_vocab - 1}")
        data = await on_model(lambda m: b"".join(m.token_piece(t) for t in body.tokens))
        return {"content": data.decode("utf-8", errors="replace")}

    @app.post("/apply-template")
    async def apply_template(request: Request) -> dict[str, Any]:
        require_ready()
        body = parse_body(await request.body(), ChatCompletionBody)
        if runtime.template is None:
            raise RequestError("this model has no chat template")
        try:
            return {"prompt": runtime.template.render(body.template_messages())}
        except ChatTemplateError as exc:
            raise RequestError(str(exc)) from exc

    app.include_router(build_router(runtime))
    return app


async def _generate(runtime: ChildRuntime, body: GenerationBody, prompt: str | list[int],
                    add_special: bool, chat: bool, conversation_id: str | None, client: Request) -> Response:
    generation = Generation(runtime, body, prompt, add_special)
    if body.stream and conversation_id is not None:
        # Resumable: it runs whether or not this client stays, from the queue on.
        await generation.start()
        return _stream(runtime, body, generation, chat, conversation_id)
    # A client that leaves while its request waits for a slot frees its place; a non-streamed
    # answer is only written at the end, so a client that left would otherwise keep its slot
    # generating for nobody until max_tokens.
    async with cancelled_if_client_leaves(client.scope, client.receive):
        await generation.start()
        if body.stream:
            return _stream(runtime, body, generation, chat, None)
        return await _complete(runtime, generation, chat)


def _base_fields(runtime: ChildRuntime, chat: bool) -> dict[str, Any]:
    completion_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    return {"id": completion_id, "created": int(time.time()), "model": runtime.settings.alias,
            "system_fingerprint": "modelyard"}


async def _complete(runtime: ChildRuntime, generation: Generation, chat: bool) -> Response:
    base = _base_fields(runtime, chat)
    parts: list[str] = []
    async for event in generation.events_until_done():
        if isinstance(event, Delta):
            parts.append(event.text)
        elif isinstance(event, Failed):
            return error_response(event.status, event.message, event.error_type)
        else:
            text = "".join(parts)
            choice: dict[str, Any] = {"index": 0, "finish_reason": event.finish_reason}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
                choice["logprobs"] = None
            return JSONResponse({**base, "object": "chat.completion" if chat else "text_completion",
                                 "choices": [choice], "usage": usage_of(event), "timings": event.timings()})
    return error_response(500, "generation ended without a result")


def _stream(runtime: ChildRuntime, body: GenerationBody, generation: Generation, chat: bool,
            conversation_id: str | None) -> Response:
    base = _base_fields(runtime, chat)
    chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta_text: str | None, finish_reason: str | None, first: bool = False) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
        if chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if delta_text is not None:
                delta["content"] = delta_text
            choice["delta"] = delta
        else:
            choice["text"] = delta_text or ""
            choice["logprobs"] = None
        return {**base, "object": chunk_object, "choices": [choice]}

    # A delta chunk is rendered once per token per stream: split the JSON around the text once,
    # so each token costs one json.dumps of a short string instead of a whole nested dict.
    marker = "\u0000delta\u0000"
    head, tail = sse(chunk(marker, None)).decode().split(json.dumps(marker))

    def delta_bytes(text: str) -> bytes:
        return (head + json.dumps(text, ensure_ascii=False) + tail).encode()

    async def stream() -> AsyncIterator[bytes]:
        if chat:
            yield sse(chunk("", None, first=True))
        async for event in generation.events_until_done():
            if isinstance(event, Delta):
                yield delta_bytes(event.text)
            elif isinstance(event, Failed):
                yield sse(error_body(event.status, event.message, event.error_type))
                return
            else:
                final = chunk(None if chat else "", event.finish_reason)
                final["timings"] = event.timings()
                yield sse(final)
                if body.wants_usage_chunk():
                    yield sse({**base, "object": chunk_object, "choices": [], "usage": usage_of(event)})
                yield sse("[DONE]")

    if conversation_id is not None:
        # Resumable: the generation feeds the conversation's session and outlives this client.
        session = runtime.sessions.start(conversation_id, stream())
        return StreamingResponse(session.follow(0), media_type="text/event-stream", headers=SSE_HEADERS)
    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)
