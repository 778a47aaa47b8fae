"""OpenAI's Responses API on the chat machinery: `POST /v1/responses` (streamed or not) and
`POST /v1/responses/input_tokens`, as the OpenAI SDK's `client.responses` calls them.

- A request becomes a ChatCompletionBody and is planned like a chat completion: `instructions`
  is a system message; `input` is a string or a list of items: messages (string content, or
  `input_text` / `output_text` / `refusal` parts), `function_call` items (an assistant's
  `tool_calls`) and `function_call_output` items (`tool` messages). Function tools and
  `tool_choice` are OpenAI's, in the Responses spelling; `text.format` is `response_format`.
- The answer is output items: a `message` with one `output_text` part, then a `function_call`
  item per call. `status` is "incomplete" (with `incomplete_details.reason` "max_output_tokens")
  when the answer was cut, as OpenAI's; the stream then ends with `response.incomplete`.
- This server stores nothing: `previous_response_id`, `conversation`, `prompt`, `store: true`
  and `background: true` are 400s naming the field, as are built-in tools (web search, file
  search, ...), image, file and audio inputs, and `reasoning` items. Errors have OpenAI's shape.
- X-Conversation-Id is ignored: resumable streams replay chat-completion chunks, and a client of
  this API could not read them back.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable
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
from child.openai_http import error_response
from child.openai_schema import ChatCompletionBody, RequestError, body_object, refuse_unknown_keys, validate_body
from child.runtime import ChildRuntime
from child.serving import cancelled_if_client_leaves
from child.stream_routes import SSE_HEADERS
from child.tool_calls import ToolCall

# Accepted and without effect: bookkeeping for the client or OpenAI's platform.
NO_OP_FIELDS = frozenset({"metadata", "user", "prompt_cache_key", "safety_identifier", "service_tier",
                          "stream_options"})
# Fields accepted only at the values that ask for nothing this server lacks; why the others are not.
NEUTRAL_FIELDS: dict[str, tuple[tuple[Any, ...], str]] = {
    "previous_response_id": ((None,), "this server stores no responses: send the whole conversation in 'input'"),
    "conversation": ((None,), "this server stores no conversations: send the whole conversation in 'input'"),
    "prompt": ((None,), "this server stores no prompts"),
    "store": ((None, False), "this server stores no responses (only false is accepted)"),
    "background": ((None, False), "this server runs no background responses (only false is accepted)"),
    "include": ((None, []), "this server has none of the extra outputs 'include' asks for"),
    "reasoning": ((None, {}), "this model gives no reasoning"),
    "truncation": ((None, "disabled"), "this server never truncates the input (only \"disabled\" is accepted)"),
    "top_logprobs": ((None, 0), "this server gives no log-probabilities on this API"),
    "max_tool_calls": ((None,), "this server does not limit calls across turns"),
}
MEDIA_PARTS = frozenset({"input_image", "input_file", "input_audio"})


class ResponsesBody(BaseModel):
    """What /v1/responses reads; `input` items are checked by hand, so that a 400 can name one."""

    model_config = ConfigDict(strict=True)

    model: str | None = None
    input: Any
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    stream: bool = False
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None


def parse_responses_body(raw: bytes) -> ResponsesBody:
    data = body_object(raw)
    for name, value in data.items():
        if name in NEUTRAL_FIELDS:
            accepted, why = NEUTRAL_FIELDS[name]
            if value not in accepted:
                raise RequestError(f"'{name}' is not supported: {why}")
        elif name not in ResponsesBody.model_fields and name not in NO_OP_FIELDS:
            raise RequestError(f"'{name}' is not supported by this engine")
    known = {k: v for k, v in data.items() if k in ResponsesBody.model_fields}
    if "input" not in known:
        raise RequestError("'input' is required")
    return validate_body(known, ResponsesBody)


# -- the request, as a chat completion ------------------------------------------------------------------

def chat_body(body: ResponsesBody) -> ChatCompletionBody:
    messages: list[dict[str, Any]] = []
    if body.instructions is not None:
        messages.append({"role": "system", "content": body.instructions})
    messages += _input_messages(body.input)
    data: dict[str, Any] = {"model": body.model, "messages": messages, "stream": body.stream,
                            "max_tokens": body.max_output_tokens, "temperature": body.temperature,
                            "top_p": body.top_p, "tools": _tools(body.tools),
                            "tool_choice": _tool_choice(body.tool_choice),
                            "parallel_tool_calls": body.parallel_tool_calls, "response_format": _text_format(body.text)}
    return validate_body({k: v for k, v in data.items() if v is not None}, ChatCompletionBody)


def _input_messages(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise RequestError("'input' must be a string or a non-empty list of items")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise RequestError(f"'{where}' must be an item object")
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message_item(item, where))
        elif kind == "function_call":
            call = _call_item(item, where)
            previous = messages[-1] if messages else None
            if previous is not None and previous["role"] == "assistant":  # the same turn's text or calls
                previous.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            refuse_unknown_keys(item, {"type", "call_id", "output", "id", "status"}, where)
            if not isinstance(item.get("call_id"), str):
                raise RequestError(f"'{where}.call_id' must be a string")
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": _content(item.get("output"), f"{where}.output")})
        elif kind == "item_reference":
            raise RequestError(f"'{where}' is an 'item_reference': this server stores no items; send the item itself")
        else:
            raise RequestError(f"'{where}' has type {kind!r}; this server reads 'message', 'function_call' and "
                               "'function_call_output' items")
    return messages


def _message_item(item: dict[str, Any], where: str) -> dict[str, Any]:
    refuse_unknown_keys(item, {"type", "role", "content", "id", "status"}, where)
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise RequestError(f"'{where}.role' must be \"user\", \"assistant\", \"system\" or \"developer\", not {role!r}")
    return {"role": role, "content": _content(item.get("content"), f"{where}.content")}


def _content(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A string, or text parts (as OpenAI chat's)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"'{where}' must be a string or a list of content parts")
    parts = []
    for i, part in enumerate(content):
        at = f"{where}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in MEDIA_PARTS:
            raise RequestError(f"'{at}' is {kind!r}: this model reads text only (it has no multimodal projector)")
        key = "refusal" if kind == "refusal" else "text"
        if kind not in ("input_text", "output_text", "refusal") or not isinstance(part.get(key), str):
            raise RequestError(f"'{at}' must be an 'input_text' or 'output_text' part with its 'text'")
        parts.append({"type": "text", "text": part[key]})
    return parts


def _call_item(item: dict[str, Any], where: str) -> dict[str, Any]:
    refuse_unknown_keys(item, {"type", "call_id", "name", "arguments", "id", "status"}, where)
    for key in ("call_id", "name", "arguments"):
        if not isinstance(item.get(key), str):
            raise RequestError(f"'{where}.{key}' must be a string")
    return {"id": item["call_id"], "type": "function", "function": {"name": item["name"],
                                                                   "arguments": item["arguments"]}}


def _tools(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    functions = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function" or not isinstance(tool, dict):
            raise RequestError(f"'{where}' is the built-in tool {kind!r}: this server runs no built-in tools; give "
                               "function tools ({\"type\": \"function\", \"name\", \"parameters\"})")
        refuse_unknown_keys(tool, {"type", "name", "description", "parameters", "strict"}, where)
        function = {key: tool[key] for key in ("name", "description", "parameters") if tool.get(key) is not None}
        functions.append({"type": "function", "function": function})
    return functions


def _tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if choice is None or isinstance(choice, str):
        return choice  # "auto", "none", "required": parse_tools checks them
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise RequestError("'tool_choice' must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", "
                       "\"name\": ...}")


def _text_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    if text is None:
        return None
    refuse_unknown_keys(text, {"format"}, "text")
    spec = text.get("format")
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise RequestError("'text.format' must be an object")
    kind = spec.get("type")
    if kind == "json_schema":
        if not isinstance(spec.get("schema"), dict):
            raise RequestError("'text.format.schema' must be a JSON schema object")
        return {"type": "json_schema", "json_schema": {"name": spec.get("name"), "schema": spec["schema"]}}
    if kind not in ("text", "json_object"):
        raise RequestError(f"'text.format.type' must be \"text\", \"json_object\" or \"json_schema\", not {kind!r}")
    return {"type": kind}


# -- the answer ---------------------------------------------------------------------------------------------

class _Answer:
    """One response's ids and the request fields its object repeats."""

    def __init__(self, runtime: ChildRuntime, body: ResponsesBody, chat: ChatCompletionBody) -> None:
        self.id = "resp_" + uuid.uuid4().hex[:24]
        self.message_id = "msg_" + uuid.uuid4().hex[:24]
        self.created_at = int(time.time())
        self.echo = {
            "model": runtime.settings.alias, "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens, "temperature": body.temperature, "top_p": body.top_p,
            "parallel_tool_calls": bool(chat.parallel_tool_calls), "tool_choice": body.tool_choice or "auto",
            "tools": body.tools or [], "text": body.text or {"format": {"type": "text"}}, "store": False,
            "background": False, "previous_response_id": None, "truncation": "disabled", "metadata": {},
        }

    def response(self, status: str, output: list[dict[str, Any]], done: Done | None = None,
                 error: dict[str, str] | None = None) -> dict[str, Any]:
        usage = None if done is None else {
            "input_tokens": done.prompt_tokens, "input_tokens_details": {"cached_tokens": done.cached_tokens},
            "output_tokens": done.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": done.prompt_tokens + done.completion_tokens}
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
                "error": error, "incomplete_details": incomplete, **self.echo, "output": output, "usage": usage}

    def message(self, text: str, status: str) -> dict[str, Any]:
        return {"id": self.message_id, "type": "message", "status": status, "role": "assistant",
                "content": [_text_part(text)]}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item_out(call: ToolCall, status: str = "completed", arguments: str | None = None) -> dict[str, Any]:
    return {"id": "fc_" + call.id.removeprefix("call_"), "type": "function_call", "status": status,
            "call_id": call.id, "name": call.name, "arguments": call.arguments if arguments is None else arguments}


def _status(done: Done) -> str:
    return "incomplete" if done.finish_reason == "length" else "completed"


async def _complete(answer: _Answer, plan: Plan, generation: Generation) -> Response:
    choices = await collect(generation)
    if isinstance(choices, Failed):
        return error_response(choices.status, choices.message, choices.error_type)
    done = choices[0].done
    assert done is not None
    text, calls = plan.split_calls(choices[0].text)
    status = _status(done)
    output = [answer.message(text, status)] if text or not calls else []
    output += [_call_item_out(call) for call in calls]
    return JSONResponse(answer.response(status, output, done))


async def _stream(answer: _Answer, plan: Plan, generation: Generation) -> AsyncIterator[bytes]:
    numbers = itertools.count()

    def event(kind: str, **fields: Any) -> bytes:
        return sse({"type": kind, "sequence_number": next(numbers), **fields}, kind)

    output: list[dict[str, Any]] = []
    yield event("response.created", response=answer.response("in_progress", []))
    yield event("response.in_progress", response=answer.response("in_progress", []))
    message = _MessageItem(answer, event)
    if plan.tools is None:
        yield message.open(len(output))
    ending: Ending | None = None
    async for part in stream_answer(plan, generation):
        if isinstance(part, Failed):
            code = "invalid_prompt" if part.status == 400 else "server_error"
            yield event("response.failed", response=answer.response("failed", output,
                                                                    error={"code": code, "message": part.message}))
            return
        if isinstance(part, str):
            yield message.delta(part, len(output))
        else:
            ending = part
    assert ending is not None
    status = _status(ending.done)
    if ending.text:
        yield message.delta(ending.text, len(output))
    if message.opened or not ending.calls:
        closing, item = message.close(len(output), status)
        yield closing
        output.append(item)
    for call in ending.calls:
        index = len(output)
        item = _call_item_out(call)
        yield event("response.output_item.added", output_index=index, item=_call_item_out(call, "in_progress", ""))
        yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                    delta=call.arguments)
        yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                    name=call.name, arguments=call.arguments)
        yield event("response.output_item.done", output_index=index, item=item)
        output.append(item)
    final = "response.completed" if status == "completed" else "response.incomplete"
    yield event(final, response=answer.response(status, output, ending.done))


class _MessageItem:
    """The streamed answer's message item: opened at its first text (at once without tools)."""

    def __init__(self, answer: _Answer, event: Callable[..., bytes]) -> None:
        self.answer = answer
        self.event = event
        self.opened = False
        self.parts: list[str] = []

    def open(self, index: int) -> bytes:
        self.opened = True
        item = {**self.answer.message("", "in_progress"), "content": []}
        return (self.event("response.output_item.added", output_index=index, item=item)
                + self.event("response.content_part.added", item_id=self.answer.message_id, output_index=index,
                             content_index=0, part=_text_part("")))

    def delta(self, text: str, index: int) -> bytes:
        head = b"" if self.opened else self.open(index)
        self.parts.append(text)
        return head + self.event("response.output_text.delta", item_id=self.answer.message_id, output_index=index,
                                 content_index=0, delta=text, logprobs=[])

    def close(self, index: int, status: str) -> tuple[bytes, dict[str, Any]]:
        head = b"" if self.opened else self.open(index)
        text = "".join(self.parts)
        item = self.answer.message(text, status)
        where = {"item_id": self.answer.message_id, "output_index": index, "content_index": 0}
        return (head + self.event("response.output_text.done", **where, text=text, logprobs=[])
                + self.event("response.content_part.done", **where, part=_text_part(text))
                + self.event("response.output_item.done", output_index=index, item=item)), item


def build_router(runtime: ChildRuntime) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/responses")
    @router.post("/responses")
    async def responses(request: Request) -> Response:
        ensure_ready(runtime)
        body = parse_responses_body(await request.body())
        chat = chat_body(body)
        plan = await plan_chat(runtime, chat)
        generation = generation_for(runtime, chat, plan)
        answer = _Answer(runtime, body, chat)
        # A client that leaves while its request waits, or before a whole answer is written,
        # frees its slot (a stream's does when the stream is closed).
        async with cancelled_if_client_leaves(request.scope, request.receive):
            await generation.start()
            if chat.stream:
                return StreamingResponse(_stream(answer, plan, generation), media_type="text/event-stream",
                                         headers=SSE_HEADERS)
            return await _complete(answer, plan, generation)

    @router.post("/v1/responses/input_tokens")
    @router.post("/responses/input_tokens")
    async def input_tokens(request: Request) -> dict[str, Any]:
        ensure_ready(runtime)
        chat = chat_body(parse_responses_body(await request.body()))
        return {"object": "response.input_tokens", "input_tokens": await count_prompt_tokens(runtime, chat)}

    return router
