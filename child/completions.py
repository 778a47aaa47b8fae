"""Chat and text completions: what a request asks for, settled before the engine sees it (the
prompt, the grammar, the tools, the log-probabilities, the choices), and the engine's events
turned into OpenAI's JSON and server-sent events.

Every question that can be answered before generating is answered before: a schema that does not
compile, `n` over the slots, a tool_choice naming no tool are 400s, never a 200 that ignored them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import Request

from child.engine.chat_template import ChatTemplateError
from child.engine.constraints import (
    ConstraintCompiler,
    ConstraintError,
    Grammar,
    grammar_definition,
    json_schema_grammar,
)
from child.engine.llama_model import LlamaModel
from child.engine.requests import Delta, Done, Failed, TokenLogprob
from child.engine.scheduler import EngineStopped
from child.generation import Generation
from child.openai_http import error_body, error_response
from child.openai_schema import ChatCompletionBody, CompletionBody, GenerationBody, RequestError
from child.runtime import ChildRuntime
from child.serving import cancelled_if_client_leaves
from child.stream_routes import SSE_HEADERS
from child.stream_sessions import Reservation, SessionStore
from child.tool_calls import (
    Family,
    ToolCall,
    ToolError,
    ToolUse,
    family_of,
    first_call_marker,
    forced_call_grammar,
    generic_messages,
    might_start_a_call,
    parse_calls,
    parse_tools,
    partial_call_marker,
    template_knows_tools,
    template_messages,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Plan:
    chat: bool
    prompt: str | list[int]
    add_special: bool
    grammar: Grammar | None = None
    tools: ToolUse | None = None
    family: Family = "hermes"
    logprobs: int | None = None

    def split_calls(self, text: str) -> tuple[str, list[ToolCall]]:
        """(the text that is not a call, the calls) of an answer: no calls without tools."""
        if self.tools is None:
            return text, []
        return parse_calls(text, self.tools, self.family)


def sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    """One server-sent event; `event` names it (Anthropic's and the Responses API's streams do)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    head = f"event: {event}\n" if event is not None else ""
    return f"{head}data: {text}\n\n".encode()


# -- planning ------------------------------------------------------------------------------------

def check_choices(runtime: ChildRuntime, body: GenerationBody) -> None:
    slots = runtime.settings.context.n_parallel
    if body.n > slots:
        raise RequestError(f"'n' is {body.n}, but this model generates at most {slots} choices at once "
                           "(its --parallel slots)")


async def compile_grammar(runtime: ChildRuntime, kind: str, source: Any, description: str) -> Grammar:
    """Validated off the event loop (a large schema takes a while); a 400 names what is wrong."""
    def work() -> Grammar:
        compiler = ConstraintCompiler.for_model(runtime.settings.model_path)
        definition = json_schema_grammar(source) if kind == "json_schema" else \
            grammar_definition(kind, source)  # type: ignore[arg-type]
        return compiler.compile(definition, description)

    try:
        return await asyncio.to_thread(work)
    except ConstraintError as exc:
        raise RequestError(str(exc)) from exc
    except RecursionError as exc:
        raise RequestError(f"{description} is nested too deeply") from exc


async def _grammar_of(runtime: ChildRuntime, body: GenerationBody) -> Grammar | None:
    source = body.grammar_source()
    if source is None:
        return None
    kind, value = source
    return await compile_grammar(runtime, kind, value, "the JSON schema" if kind == "json_schema" else "the grammar")


def render_chat(runtime: ChildRuntime, body: ChatCompletionBody) -> tuple[str, ToolUse | None, Family]:
    """The prompt a chat request becomes (tools included), its tools and their call format."""
    try:
        return _render_chat(runtime, body)
    except RecursionError as exc:  # JSON in the body may nest deeper than rendering it can go
        raise RequestError("the messages or tools are nested too deeply") from exc


def _render_chat(runtime: ChildRuntime, body: ChatCompletionBody) -> tuple[str, ToolUse | None, Family]:
    if runtime.template is None:
        raise RequestError("this model has no chat template: use /v1/completions, or start it with "
                           "--chat-template NAME")
    try:
        tools = parse_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
    except ToolError as exc:
        raise RequestError(str(exc)) from exc
    messages = body.template_messages()
    source = runtime.template_source or ""
    family = family_of(source)
    extra = dict(body.chat_template_kwargs or {})
    if tools is not None and tools.offered and template_knows_tools(source):
        messages = template_messages(messages)
        extra["tools"] = [t.openai() for t in tools.offered]
    elif tools is not None or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        if tools is not None and tools.offered and not runtime.said_generic_tools:
            runtime.said_generic_tools = True
            log.info("the chat template knows no tools: they are described in a generic prompt")
        messages = generic_messages(messages, tools or ToolUse((), "none", False))
        family = "hermes"
    try:
        prompt = runtime.template.render(messages, **extra)
    except ChatTemplateError as exc:
        raise RequestError(str(exc)) from exc
    return prompt, (tools if tools is not None and tools.offered else None), family


def ensure_ready(runtime: ChildRuntime) -> None:
    """A 503 while the model loads (llama-server's answer then)."""
    if runtime.scheduler is None:
        raise RequestError("Loading model", 503, "unavailable_error")


async def on_model(runtime: ChildRuntime, work: Callable[[LlamaModel], T]) -> T:
    """`work` run on the engine's thread, between decode steps (the model is not thread-safe)."""
    ensure_ready(runtime)
    assert runtime.scheduler is not None
    try:
        return await asyncio.wrap_future(runtime.scheduler.call(work))
    except EngineStopped as exc:
        raise RequestError(str(exc), 503, "unavailable_error") from exc


async def count_prompt_tokens(runtime: ChildRuntime, body: ChatCompletionBody) -> int:
    """How many tokens the request's prompt is: what a generation reports as its prompt tokens."""
    ensure_ready(runtime)
    assert runtime.scheduler is not None
    prompt = render_chat(runtime, body)[0]
    # add_special as plan_chat's: the template writes BOS itself.
    work = runtime.scheduler.call(lambda model: len(model.tokenize(prompt, add_special=False, parse_special=True)))
    try:
        return await asyncio.wrap_future(work)
    except EngineStopped as exc:
        raise RequestError(str(exc), 503, "unavailable_error") from exc


async def plan_chat(runtime: ChildRuntime, body: ChatCompletionBody) -> Plan:
    check_choices(runtime, body)
    prompt, tools, family = render_chat(runtime, body)
    grammar = await _grammar_of(runtime, body)
    if tools is not None and tools.forced:
        if grammar is not None:
            raise RequestError("'tool_choice' \"required\" or a named function cannot be combined with "
                               "'response_format', 'json_schema' or 'grammar'")
        try:
            definition = forced_call_grammar(tools, family)
        except RecursionError as exc:
            raise RequestError("a tool's 'parameters' schema is nested too deeply") from exc
        grammar = await compile_grammar(runtime, "lark", definition, "the tool calls")
    return Plan(chat=True, prompt=prompt, add_special=False,  # the template writes BOS itself
                grammar=grammar, tools=tools, family=family, logprobs=body.logprobs_count())


async def plan_completion(runtime: ChildRuntime, body: CompletionBody) -> Plan:
    check_choices(runtime, body)
    return Plan(chat=False, prompt=body.prompt_value(), add_special=True, grammar=await _grammar_of(runtime, body),
                logprobs=body.logprobs_count())


# -- one choice's output ---------------------------------------------------------------------------

def _token_text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="ignore")  # a piece of a character is shown in `bytes` only


def chat_logprob(entry: TokenLogprob) -> dict[str, Any]:
    """OpenAI's entry (with llama-server's `id` too)."""
    return {"id": entry.token, "token": _token_text(entry.piece), "bytes": list(entry.piece),
            "logprob": entry.logprob,
            "top_logprobs": [{"id": t, "token": _token_text(p), "bytes": list(p), "logprob": lp}
                             for t, p, lp in entry.top]}


def legacy_logprobs(entries: list[TokenLogprob] | tuple[TokenLogprob, ...], offset: int) -> dict[str, Any]:
    """The completions API's shape: parallel lists, `text_offset` counted from `offset`."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(_token_text(entry.piece))
    return {"tokens": [_token_text(e.piece) for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{_token_text(p): lp for _, p, lp in e.top} for e in entries], "text_offset": offsets}


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    index: int
    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    done: Done | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


class CallWatcher:
    """For a streamed answer with tools: what may go out as text now, and what is held back because
    it may be (or is) a call. Forced calls hold everything."""

    def __init__(self, forced: bool) -> None:
        self.held = ""
        self.state = "call" if forced else "undecided"  # "undecided" | "text" | "call"

    def feed(self, text: str) -> str:
        self.held += text
        if self.state == "undecided":
            if might_start_a_call(self.held.lstrip()):
                return ""
            self.state = "text"
        if self.state == "call":
            return ""
        position = first_call_marker(self.held)
        if position >= 0:  # text, then a call: the text goes, the call is held to the end
            out, self.held = self.held[:position], self.held[position:]
            self.state = "call"
            return out
        keep = partial_call_marker(self.held)  # the end may be the start of a marker
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep:]
        return out


# -- answering -----------------------------------------------------------------------------------

def generation_for(runtime: ChildRuntime, body: GenerationBody, plan: Plan) -> Generation:
    """The engine request a planned body becomes (not yet submitted: `start()` does)."""
    # A forced tool call is made whole: a stop string must not cut it (it would leave no call).
    stop: list[str] | None = [] if plan.tools is not None and plan.tools.forced else None
    return Generation(runtime, body, plan.prompt, plan.add_special, plan.grammar, plan.logprobs, stop)


def refuse_if_deleted(sessions: SessionStore, reservation: Reservation, cancel: Callable[[], None]) -> None:
    """A DELETE of the conversation, or a later request of it, came while this one was prepared:
    it does not start (`cancel` frees what it holds in the engine)."""
    refusal = sessions.refusal(reservation)
    if refusal is not None:
        cancel()
        raise RequestError(f"conversation '{reservation.conversation_id}' was {refusal} while this request "
                           "was prepared", 409)


async def answer(runtime: ChildRuntime, body: GenerationBody, plan: Plan, reservation: Reservation | None,
                 client: Request) -> Response:
    """`reservation`: the request's conversation (runtime.sessions.reserve), for a resumable stream."""
    generation = generation_for(runtime, body, plan)
    if body.stream and reservation is not None:
        # Resumable: it runs whether or not this client stays, from the queue on.
        await generation.start()
        refuse_if_deleted(runtime.sessions, reservation, generation.request.cancel)
        return _stream(runtime, body, plan, generation, reservation)
    # A client that leaves while its request waits for a slot frees its place; a non-streamed
    # answer is only written at the end, so a client that left would otherwise keep its slots
    # generating for nobody until max_tokens.
    async with cancelled_if_client_leaves(client.scope, client.receive):
        await generation.start()
        if body.stream:
            return _stream(runtime, body, plan, generation, None)
        return await _complete(runtime, plan, generation)


def _base_fields(runtime: ChildRuntime, chat: bool) -> dict[str, Any]:
    completion_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    return {"id": completion_id, "created": int(time.time()), "model": runtime.settings.alias,
            "system_fingerprint": "modelyard"}


def usage_of(dones: list[Done]) -> dict[str, Any]:
    prompt = dones[0].prompt_tokens
    completion = sum(d.completion_tokens for d in dones)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": dones[0].cached_tokens}}


def _timings(dones: list[Done]) -> dict[str, float | int]:
    return dones[0].timings() if len(dones) == 1 else {
        **dones[0].timings(), "predicted_n": sum(d.completion_tokens for d in dones)}


async def collect(generation: Generation) -> list[ChoiceState] | Failed:
    """Every choice's whole answer (each with its Done), or how the generation failed."""
    choices = [ChoiceState(i) for i in range(generation.request.n)]
    async for event in generation.events_until_done():
        if isinstance(event, Failed):
            return event
        state = choices[event.choice]
        if isinstance(event, Delta):
            state.parts.append(event.text)
            state.logprobs.extend(event.logprobs)
        else:
            state.done = event
    if any(c.done is None for c in choices):
        return Failed("generation ended without a result", 500)
    return choices


@dataclass(frozen=True)
class Ending:
    """How a streamed single answer ended: the text held back until then (it may have been a
    call), the calls, and the engine's Done."""

    text: str
    calls: list[ToolCall]
    done: Done


async def stream_answer(plan: Plan, generation: Generation) -> AsyncIterator[str | Ending | Failed]:
    """One choice's answer as it may be shown: text as soon as it cannot be (part of) a call, then
    its Ending; or a Failed. For the APIs that stream one answer and give calls whole at its end."""
    watcher = CallWatcher(plan.tools.forced) if plan.tools is not None else None
    async for event in generation.events_until_done():
        if isinstance(event, Failed):
            yield event
            return
        if isinstance(event, Delta):
            text = watcher.feed(event.text) if watcher is not None else event.text
            if text:
                yield text
            continue
        content, calls = plan.split_calls(watcher.held) if watcher is not None and watcher.held else ("", [])
        yield Ending(content, calls, event)


async def _complete(runtime: ChildRuntime, plan: Plan, generation: Generation) -> Response:
    base = _base_fields(runtime, plan.chat)
    choices = await collect(generation)
    if isinstance(choices, Failed):
        return error_response(choices.status, choices.message, choices.error_type)
    dones = [c.done for c in choices if c.done is not None]
    rendered = [_choice_json(plan, c) for c in choices]
    return JSONResponse({**base, "object": "chat.completion" if plan.chat else "text_completion",
                         "choices": rendered, "usage": usage_of(dones), "timings": _timings(dones)})


def _choice_json(plan: Plan, state: ChoiceState) -> dict[str, Any]:
    assert state.done is not None
    finish_reason = state.done.finish_reason
    choice: dict[str, Any] = {"index": state.index}
    if not plan.chat:
        choice["text"] = state.text
        choice["logprobs"] = legacy_logprobs(state.logprobs, 0) if plan.logprobs is not None else None
        choice["finish_reason"] = finish_reason
        return choice
    message: dict[str, Any] = {"role": "assistant", "content": state.text}
    content, calls = plan.split_calls(state.text)
    if calls:
        message = {"role": "assistant", "content": content or None, "tool_calls": [c.openai() for c in calls]}
        finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
    choice["message"] = message
    if plan.logprobs is not None:
        choice["logprobs"] = {"content": [chat_logprob(e) for e in state.logprobs]}
    choice["finish_reason"] = finish_reason
    return choice


def _stream(runtime: ChildRuntime, body: GenerationBody, plan: Plan, generation: Generation,
            reservation: Reservation | None) -> Response:
    base = _base_fields(runtime, plan.chat)
    chunk_object = "chat.completion.chunk" if plan.chat else "text_completion"
    n = generation.request.n

    def chunk(index: int, finish_reason: str | None = None, text: str | None = None, *, role: bool = False,
              logprobs: tuple[TokenLogprob, ...] = (), offset: int = 0,
              tool_calls: list[dict[str, Any]] | None = None) -> bytes:
        choice: dict[str, Any] = {"index": index}
        if plan.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            if tool_calls is not None:
                delta["tool_calls"] = tool_calls
            choice["delta"] = delta
            if logprobs:
                choice["logprobs"] = {"content": [chat_logprob(e) for e in logprobs]}
        else:
            choice["text"] = text or ""
            choice["logprobs"] = legacy_logprobs(logprobs, offset) if plan.logprobs is not None else None
        choice["finish_reason"] = finish_reason
        return sse({**base, "object": chunk_object, "choices": [choice]})

    # A plain text delta is rendered once per token per stream: the JSON around the text is split
    # once per choice, so each token costs one json.dumps of a short string.
    marker = "\u0000delta\u0000"
    around = [chunk(i, text=marker).decode().split(json.dumps(marker)) for i in range(n)]

    def text_chunk(index: int, text: str) -> bytes:
        head, tail = around[index]
        return (head + json.dumps(text, ensure_ascii=False) + tail).encode()

    async def stream() -> AsyncIterator[bytes]:
        watchers = [CallWatcher(plan.tools.forced) if plan.tools is not None else None for _ in range(n)]
        offsets = [0] * n
        dones: list[Done] = []
        if plan.chat:
            for index in range(n):
                yield chunk(index, text="", role=True)
        async for event in generation.events_until_done():
            if isinstance(event, Failed):
                yield sse(error_body(event.status, event.message, event.error_type))
                return
            index = event.choice
            watcher = watchers[index]
            if isinstance(event, Delta):
                text = watcher.feed(event.text) if watcher is not None else event.text
                if event.logprobs:
                    yield chunk(index, text=text, logprobs=event.logprobs, offset=offsets[index])
                elif text:
                    yield text_chunk(index, text)
                offsets[index] += len(event.text)
                continue
            dones.append(event)
            finish_reason = event.finish_reason
            if watcher is not None and watcher.held:
                content, calls = plan.split_calls(watcher.held)
                if content:
                    yield chunk(index, text=content)
                if calls:
                    yield chunk(index, tool_calls=_call_deltas(calls))
                    finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
            final = json.loads(chunk(index, finish_reason, None if plan.chat else "")[6:])
            final["timings"] = event.timings()
            yield sse(final)
        if body.wants_usage_chunk():
            yield sse({**base, "object": chunk_object, "choices": [], "usage": usage_of(dones)})
        yield sse("[DONE]")

    if reservation is not None:
        # Resumable: the generation feeds the conversation's session and outlives this client.
        session = runtime.sessions.start(reservation, stream())
        return StreamingResponse(session.follow(0), media_type="text/event-stream", headers=SSE_HEADERS)
    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


def _call_deltas(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """OpenAI's streamed form of calls: each with its id, name and (here in one piece) arguments."""
    return [{"index": i, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for i, c in enumerate(calls)]
