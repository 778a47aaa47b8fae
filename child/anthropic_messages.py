"""Anthropic's Messages API on the chat machinery: `POST /v1/messages` (streamed or not) and
`POST /v1/messages/count_tokens`, as the anthropic SDK and Claude clients call them.

- A request becomes a ChatCompletionBody and is planned like a chat completion: `system` is a
  system message, an assistant's `tool_use` blocks its `tool_calls`, `tool_result` blocks `tool`
  messages, `tools` ({name, description, input_schema}) OpenAI functions, and `tool_choice`
  auto / any / tool / none OpenAI's auto / required / a named function / none (`any` and `tool`
  are forced by a grammar, as `required` is). One call per answer unless
  `disable_parallel_tool_use` is false (the chat route's default, not Anthropic's).
- The answer is content blocks: its text, then a `tool_use` block per call; streamed, Anthropic's
  events (message_start, ping, content_block_start/delta/stop, message_delta, message_stop).
- `usage.input_tokens` is the whole prompt, cached or not (count_tokens gives the same number);
  no `cache_*` counts are reported, since Anthropic's clients add those to input_tokens.
- Errors on these routes have Anthropic's shape, `{"type": "error", "error": {"type", "message"}}`.
  What cannot be honoured is a 400 naming it: an `image` or `document` block (this model reads
  text only), a server tool, `thinking`, a field this API does not have. `output_config.format`
  (a JSON schema) constrains the answer as chat's `response_format` does.
- `stop_reason` is end_turn, max_tokens, tool_use, or stop_sequence with the `stop_sequence`
  that ended the answer (llama-server says end_turn then).
- X-Conversation-Id is ignored: resumable streams replay OpenAI's chunks, and a client of this
  API could not read them back.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from child.completions import (
    Ending,
    Plan,
    collect,
    count_prompt_tokens,
    ensure_ready,
    generation_for,
    plan_chat,
    sse,
    stream_answer,
)
from child.engine.requests import Done, Failed
from child.generation import Generation
from child.openai_schema import ChatCompletionBody, RequestError, body_object, refuse_unknown_keys, validate_body
from child.runtime import ChildRuntime
from child.serving import cancelled_if_client_leaves
from child.stream_routes import SSE_HEADERS
from child.tool_calls import ToolCall

# Anthropic's error types, by status.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
               503: "overloaded_error", 529: "overloaded_error"}
# Bookkeeping for Anthropic's platform, and hints that change no output here.
NO_OP_FIELDS = frozenset({"metadata", "service_tier", "cache_control", "inference_geo", "speed", "diagnostics",
                          "user_profile_id", "workspace_id"})
BLOCK_NO_OP_FIELDS = frozenset({"cache_control", "citations"})  # hints that change no output here
MEDIA_BLOCKS = frozenset({"image", "document"})


class MessagesBody(BaseModel):
    """What /v1/messages and /v1/messages/count_tokens read; blocks are checked by hand, so that
    a 400 can name the block."""

    model_config = ConfigDict(strict=True)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)  # required by /v1/messages
    messages: list[Any] = Field(min_length=1)
    system: Any = None
    stop_sequences: list[str] | None = Field(default=None, max_length=16)
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool = False
    tools: list[Any] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None  # only {"type": "disabled"}
    output_config: dict[str, Any] | None = None  # its `format` is structured output; `effort` changes nothing


def parse_messages_body(raw: bytes) -> MessagesBody:
    data = body_object(raw)
    for name in data:
        if name not in MessagesBody.model_fields and name not in NO_OP_FIELDS:
            raise RequestError(f"'{name}' is not supported by this engine")
    body = validate_body({k: v for k, v in data.items() if k in MessagesBody.model_fields}, MessagesBody)
    if body.thinking is not None and body.thinking.get("type") != "disabled":
        raise RequestError("'thinking' is not supported by this model (only {\"type\": \"disabled\"} is accepted)")
    return body


# -- the request, as a chat completion --------------------------------------------------------------

def chat_body(body: MessagesBody) -> ChatCompletionBody:
    messages: list[dict[str, Any]] = []
    if body.system is not None:
        messages.append({"role": "system", "content": _text_parts(body.system, "system")})
    for i, message in enumerate(body.messages):
        messages.extend(_chat_messages(message, f"messages[{i}]"))
    tool_choice, parallel = _tool_choice(body.tool_choice)
    data: dict[str, Any] = {"model": body.model, "messages": messages, "stream": body.stream,
                            "max_tokens": body.max_tokens, "temperature": body.temperature, "top_p": body.top_p,
                            "top_k": body.top_k, "stop": body.stop_sequences, "tool_choice": tool_choice,
                            "tools": _tools(body.tools), "parallel_tool_calls": parallel,
                            "response_format": _output_format(body.output_config)}
    return validate_body({k: v for k, v in data.items() if v is not None}, ChatCompletionBody)


def _output_format(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """`output_config.format` as OpenAI's response_format."""
    if config is None:
        return None
    refuse_unknown_keys(config, {"format", "effort"}, "output_config", BLOCK_NO_OP_FIELDS)
    spec = config.get("format")
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("type") != "json_schema" or not isinstance(spec.get("schema"), dict):
        raise RequestError("'output_config.format' must be {\"type\": \"json_schema\", \"schema\": {...}}")
    refuse_unknown_keys(spec, {"type", "schema"}, "output_config.format", BLOCK_NO_OP_FIELDS)
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": spec["schema"]}}


def _text_parts(value: Any, where: str) -> str | list[dict[str, Any]]:
    """A string, or a list of text blocks (as OpenAI's text parts)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise RequestError(f"'{where}' must be a string or a list of text blocks")
    parts = []
    for i, block in enumerate(value):
        if _block_type(block, f"{where}[{i}]") != "text":
            raise RequestError(f"'{where}[{i}]' is a {block['type']!r} block; only 'text' blocks are accepted here")
        parts.append(_text_part(block, f"{where}[{i}]"))
    return parts


def _block_type(block: Any, where: str) -> str:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise RequestError(f"'{where}' must be a content block ({{\"type\": ...}})")
    kind = str(block["type"])
    if kind in MEDIA_BLOCKS:
        raise RequestError(f"'{where}' is an {kind!r} block: this model reads text only (it has no multimodal "
                           "projector)")
    return kind


def _text_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    refuse_unknown_keys(block, {"type", "text"}, where, BLOCK_NO_OP_FIELDS)
    if not isinstance(block.get("text"), str):
        raise RequestError(f"'{where}.text' must be a string")
    return {"type": "text", "text": block["text"]}


def _chat_messages(message: Any, where: str) -> list[dict[str, Any]]:
    """One Anthropic message as chat messages: tool results become `tool` messages of their own."""
    if not isinstance(message, dict):
        raise RequestError(f"'{where}' must be an object with 'role' and 'content'")
    refuse_unknown_keys(message, {"role", "content"}, where, BLOCK_NO_OP_FIELDS)
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise RequestError(f"'{where}.role' must be \"user\" or \"assistant\", not {role!r}")
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise RequestError(f"'{where}.content' must be a string or a list of content blocks")
    out: list[dict[str, Any]] = []
    text: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        at = f"{where}.content[{i}]"
        kind = _block_type(block, at)
        if kind == "text":
            text.append(_text_part(block, at))
        elif kind == "tool_use" and role == "assistant":
            calls.append(_tool_call(block, at))
        elif kind == "tool_result" and role == "user":
            if text:  # what came before the result stays before it
                out.append({"role": "user", "content": text})
                text = []
            out.append(_tool_message(block, at))
        elif kind in ("tool_use", "tool_result"):
            raise RequestError(f"'{at}' is a {kind!r} block, which a {role!r} message cannot hold")
        else:
            raise RequestError(f"'{at}' has type {kind!r}; expected 'text', 'tool_use' or 'tool_result'")
    if role == "assistant":
        assistant: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            assistant["tool_calls"] = calls
        return [assistant]
    if text or not out:
        out.append({"role": "user", "content": text})
    return out


def _tool_call(block: dict[str, Any], where: str) -> dict[str, Any]:
    refuse_unknown_keys(block, {"type", "id", "name", "input"}, where, BLOCK_NO_OP_FIELDS)
    for key in ("id", "name"):
        if not isinstance(block.get(key), str):
            raise RequestError(f"'{where}.{key}' must be a string")
    if not isinstance(block.get("input"), dict):
        raise RequestError(f"'{where}.input' must be an object")
    return {"id": block["id"], "type": "function",
            "function": {"name": block["name"], "arguments": json.dumps(block["input"], ensure_ascii=False)}}


def _tool_message(block: dict[str, Any], where: str) -> dict[str, Any]:
    refuse_unknown_keys(block, {"type", "tool_use_id", "content", "is_error"}, where, BLOCK_NO_OP_FIELDS)
    if not isinstance(block.get("tool_use_id"), str):
        raise RequestError(f"'{where}.tool_use_id' must be a string")
    if not isinstance(block.get("is_error", False), bool):
        raise RequestError(f"'{where}.is_error' must be a boolean")
    content = block.get("content", "")
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": _text_parts(content, f"{where}.content")}


def _tools(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    functions = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise RequestError(f"'{where}' must be {{\"name\", \"description\", \"input_schema\"}}")
        kind = tool.get("type", "custom")
        if kind != "custom":
            raise RequestError(f"'{where}' is the server tool {kind!r}: this server runs no tools itself; give "
                               "client tools ({\"name\", \"description\", \"input_schema\"})")
        refuse_unknown_keys(tool, {"type", "name", "description", "input_schema"}, where, BLOCK_NO_OP_FIELDS)
        if not isinstance(tool.get("name"), str):
            raise RequestError(f"'{where}.name' must be a string")
        if not isinstance(tool.get("input_schema"), dict):
            raise RequestError(f"'{where}.input_schema' must be a JSON schema object")
        if not isinstance(tool.get("description", ""), str):
            raise RequestError(f"'{where}.description' must be a string")
        functions.append({"type": "function", "function": {
            "name": tool["name"], "description": tool.get("description", ""), "parameters": tool["input_schema"]}})
    return functions


def _tool_choice(choice: dict[str, Any] | None) -> tuple[str | dict[str, Any] | None, bool]:
    """(OpenAI's tool_choice, whether calls may be parallel). One call per answer unless
    `disable_parallel_tool_use` is false: the chat route's default (llama-server's), since a small
    model offered several calls tends to repeat one until max_tokens."""
    if choice is None:
        return None, False
    refuse_unknown_keys(choice, {"type", "name", "disable_parallel_tool_use"}, "tool_choice", BLOCK_NO_OP_FIELDS)
    disable = choice.get("disable_parallel_tool_use", True)
    if not isinstance(disable, bool):
        raise RequestError("'tool_choice.disable_parallel_tool_use' must be a boolean")
    kind = choice.get("type")
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise RequestError("'tool_choice.name' must name a tool when 'tool_choice.type' is \"tool\"")
        return {"type": "function", "function": {"name": choice["name"]}}, not disable
    openai = {"auto": "auto", "any": "required", "none": "none"}.get(kind) if isinstance(kind, str) else None
    if openai is None:
        raise RequestError(f"'tool_choice.type' must be \"auto\", \"any\", \"tool\" or \"none\", not {kind!r}")
    return openai, not disable


# -- the answer ------------------------------------------------------------------------------------

def _error(status: int, message: str) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(_error_body(status, message), status_code=status, headers=headers)


def _error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


def _tool_use(call: ToolCall) -> dict[str, Any]:
    # Anthropic's ids begin with toolu_; the call's own id goes on after it.
    arguments = json.loads(call.arguments)
    # Anthropic's `input` is an object; a model may write any JSON value as its arguments.
    return {"type": "tool_use", "id": "toolu_" + call.id.removeprefix("call_"), "name": call.name,
            "input": arguments if isinstance(arguments, dict) else {"arguments": arguments}}


def _stop(done: Done | None, calls: list[ToolCall]) -> dict[str, str | None]:
    """`stop_reason` and `stop_sequence` (both null while a stream has not ended)."""
    if done is None:
        reason = None
    elif done.finish_reason == "length":
        reason = "max_tokens"
    elif calls:
        reason = "tool_use"
    else:
        reason = "stop_sequence" if done.stop_word else "end_turn"
    return {"stop_reason": reason, "stop_sequence": (done.stop_word or None) if done is not None else None}


def _message(runtime: ChildRuntime, message_id: str, content: list[dict[str, Any]], done: Done | None,
             calls: list[ToolCall], usage: dict[str, int]) -> dict[str, Any]:
    return {"id": message_id, "type": "message", "role": "assistant", "model": runtime.settings.alias,
            "content": content, **_stop(done, calls), "usage": usage}


def _usage(done: Done) -> dict[str, int]:
    return {"input_tokens": done.prompt_tokens, "output_tokens": done.completion_tokens}


async def _complete(runtime: ChildRuntime, plan: Plan, generation: Generation) -> Response:
    choices = await collect(generation)
    if isinstance(choices, Failed):
        return _error(choices.status, choices.message)
    done = choices[0].done
    assert done is not None
    text, calls = plan.split_calls(choices[0].text)
    content = [{"type": "text", "text": text}] if text or not calls else []
    content += [_tool_use(call) for call in calls]
    message_id = "msg_" + uuid.uuid4().hex[:24]
    return JSONResponse(_message(runtime, message_id, content, done, calls, _usage(done)))


class _Blocks:
    """A streamed message's content blocks: one text block, opened at its first text (at once
    without tools), then a tool_use block per call."""

    def __init__(self) -> None:
        self.index = 0
        self.text_open = False

    def text(self, text: str) -> bytes:
        out = b"" if self.text_open else self.open_text()
        delta = {"type": "content_block_delta", "index": self.index, "delta": {"type": "text_delta", "text": text}}
        return out + sse(delta, "content_block_delta")

    def open_text(self) -> bytes:
        self.text_open = True
        return sse({"type": "content_block_start", "index": self.index, "content_block": {"type": "text", "text": ""}},
                   "content_block_start")

    def close(self) -> bytes:
        self.index += 1
        self.text_open = False
        return sse({"type": "content_block_stop", "index": self.index - 1}, "content_block_stop")

    def tool_use(self, call: ToolCall) -> bytes:
        whole = _tool_use(call)
        start = sse({"type": "content_block_start", "index": self.index, "content_block": {**whole, "input": {}}},
                    "content_block_start")
        delta = sse({"type": "content_block_delta", "index": self.index,
                     "delta": {"type": "input_json_delta", "partial_json": json.dumps(whole["input"])}},
                    "content_block_delta")
        return start + delta + self.close()


async def _stream(runtime: ChildRuntime, plan: Plan, generation: Generation,
                  prompt_tokens: int) -> AsyncIterator[bytes]:
    message_id = "msg_" + uuid.uuid4().hex[:24]
    start = _message(runtime, message_id, [], None, [], {"input_tokens": prompt_tokens, "output_tokens": 0})
    yield sse({"type": "message_start", "message": start}, "message_start")
    blocks = _Blocks()
    if plan.tools is None:
        yield blocks.open_text()
    yield sse({"type": "ping"}, "ping")
    ending: Ending | None = None
    async for part in stream_answer(plan, generation):
        if isinstance(part, Failed):
            yield sse(_error_body(part.status, part.message), "error")
            return
        if isinstance(part, str):
            yield blocks.text(part)
        else:
            ending = part
    assert ending is not None
    if ending.text:
        yield blocks.text(ending.text)
    if blocks.text_open or not ending.calls:
        yield (b"" if blocks.text_open else blocks.open_text()) + blocks.close()
    for call in ending.calls:
        yield blocks.tool_use(call)
    yield sse({"type": "message_delta", "delta": _stop(ending.done, ending.calls),
               "usage": {"output_tokens": ending.done.completion_tokens}}, "message_delta")
    yield sse({"type": "message_stop"}, "message_stop")


def build_router(runtime: ChildRuntime) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/messages")
    async def messages(request: Request) -> Response:
        try:
            ensure_ready(runtime)
            body = parse_messages_body(await request.body())
            if body.max_tokens is None:
                raise RequestError("'max_tokens' is required")
            chat = chat_body(body)
            plan = await plan_chat(runtime, chat)
            generation = generation_for(runtime, chat, plan)
            # A client that leaves while its request waits, or before a whole answer is written,
            # frees its slot (a stream's does when the stream is closed).
            async with cancelled_if_client_leaves(request.scope, request.receive):
                accepted = await generation.start()
                if chat.stream:
                    return StreamingResponse(_stream(runtime, plan, generation, accepted.prompt_tokens),
                                             media_type="text/event-stream", headers=SSE_HEADERS)
                return await _complete(runtime, plan, generation)
        except RequestError as exc:
            return _error(exc.status, exc.message)

    @router.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> Response:
        try:
            ensure_ready(runtime)
            chat = chat_body(parse_messages_body(await request.body()))
            return JSONResponse({"input_tokens": await count_prompt_tokens(runtime, chat)})
        except RequestError as exc:
            return _error(exc.status, exc.message)

    return router
