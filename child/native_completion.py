"""llama-server's native `POST /completion`, answered field for field as llama-server answers it.

The body is CompletionBody's (the sampling fields, `n_predict`, `n_probs`, `stop`, `grammar`,
`json_schema`, `cache_prompt`, `n`...) with llama-server's own forms on top:

- `prompt`: a string, a token list, a mix of both (`["text", 123, "more"]`: the first string gets
  the model's BOS), `{"prompt_string": ...}`, or a list of those, which is several prompts.
- `logit_bias`: also `[[token or text, bias or false], ...]` (a text biases each of its tokens;
  false bans).
- `return_tokens`: the generated token ids in `tokens`.

Prompts are tokenized here, on the scheduler thread, so that `prompt` (the prompt as the model read
it) and `tokens_evaluated` can be answered; then each prompt is one engine request (with `n`, n
choices of it), all sharing the request's planning (grammar, checks) through plan_completion.

The answer is one result object, or a list of them (index = prompt * n + choice) when there are
several. A stream sends one `data: {...}` event per delta with that delta's token ids, then each
result's final object (`stop: true`, content "", no `completion_probabilities`: they went with the
deltas), and no `[DONE]`. `stop_type` is "eos", "limit" or "word" (with `stopping_word`).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from child.completions import Plan, chat_logprob, ensure_ready, on_model, plan_completion, refuse_if_deleted, sse
from child.engine.llama_model import LlamaModel
from child.engine.requests import Delta, Done, Failed, TokenLogprob
from child.generation import Generation
from child.openai_http import error_body, error_response
from child.openai_schema import CompletionBody, RequestError, parse_body
from child.runtime import ChildRuntime
from child.serving import cancelled_if_client_leaves
from child.stream_routes import SSE_HEADERS, conversation_id_of

PromptPart = str | int
UNSET_SEED = 0xFFFFFFFF  # llama-server's LLAMA_DEFAULT_SEED: "a random seed"
PROMPT_FORMS = ('"prompt" elements must be a string, a list of tokens, a JSON object containing a prompt string, '
                "or a list of mixed strings & tokens.")


class NativeCompletionBody(CompletionBody):
    """CompletionBody with llama-server's wider `prompt` and `logit_bias`, read by this module."""

    prompt: Any  # read by prompt_parts, which answers llama-server's message for a wrong one
    logit_bias: dict[str, float | bool] | list[list[Any]] | None = None  # type: ignore[assignment]
    return_tokens: bool = False


@dataclass(frozen=True)
class Prompt:
    tokens: list[int]
    text: str  # the tokens as text, special ones included (llama-server's `prompt`)


# -- the request ---------------------------------------------------------------------------------

def prompt_parts(value: Any) -> list[list[PromptPart]]:
    """Each prompt of the body as its pieces, in llama-server's forms: a list that holds a number
    is one mixed prompt; any other list is several prompts."""
    if isinstance(value, list):
        if not value:
            raise RequestError('"prompt" must not be empty')
        if any(_is_token(v) for v in value):
            return [_one_prompt(value)]
        return [_one_prompt(v) for v in value]
    return [_one_prompt(value)]


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _one_prompt(value: Any) -> list[PromptPart]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        if value.get("multimodal_data"):
            raise RequestError("'prompt.multimodal_data': this model reads text only (it has no multimodal projector)")
        text = value.get("prompt_string")
        if isinstance(text, str):
            return [text]
    if isinstance(value, list) and all(isinstance(v, str) or _is_token(v) for v in value):
        return list(value)
    raise RequestError(PROMPT_FORMS)


def bias_entries(value: dict[str, float | bool] | list[list[Any]] | None) -> list[tuple[str | int, float]]:
    """llama-server's logit_bias forms as (token id or text, bias); `false` is -inf (a ban)."""
    if value is None:
        return []
    pairs = list(value.items()) if isinstance(value, dict) else value
    entries: list[tuple[str | int, float]] = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise RequestError(f"'logit_bias[{i}]' must be a [token or text, bias] pair")
        key, bias = pair
        if bias is False:
            bias = -math.inf
        elif isinstance(bias, bool) or not isinstance(bias, int | float):
            raise RequestError(f"the logit_bias of {key!r} must be a number or false")
        if isinstance(key, str) and key.lstrip("-").isascii() and key.lstrip("-").isdigit() and isinstance(value, dict):
            key = int(key)  # an object's keys are token ids, as in OpenAI's form
        if not isinstance(key, str) and not _is_token(key):
            raise RequestError(f"'logit_bias[{i}]' must name a token id or a text")
        entries.append((key, float(bias)))
    return entries


def tokenized(model: LlamaModel, parts: list[list[PromptPart]], bias: list[tuple[str | int, float]],
              ) -> tuple[list[Prompt], dict[str, float]]:
    """On the scheduler thread: each prompt's tokens and text, and logit_bias by token id."""
    prompts = []
    for pieces in parts:
        tokens: list[int] = []
        for i, piece in enumerate(pieces):
            if isinstance(piece, str):  # as llama-server: only a leading text gets BOS
                tokens += model.tokenize(piece, add_special=i == 0, parse_special=True)
            else:
                tokens.append(piece)
        if any(t < 0 or t >= model.n_vocab for t in tokens):
            raise RequestError(f"the prompt has a token id outside the vocabulary (0..{model.n_vocab - 1})")
        text = b"".join(model.token_piece(t, special=True) for t in tokens).decode("utf-8", errors="replace")
        prompts.append(Prompt(tokens, text))
    by_token: dict[str, float] = {}
    for key, value in bias:
        for token in (model.tokenize(key, add_special=False, parse_special=False) if isinstance(key, str) else [key]):
            by_token[str(token)] = value
    return prompts, by_token


def generation_settings(generation: Generation, body: NativeCompletionBody, n_probs: int) -> dict[str, Any]:
    """llama-server's `generation_settings`: what this request sampled with; the samplers this
    engine does not have at the values that turn them off."""
    request = generation.request
    sampling = request.sampling
    return {
        "seed": sampling.seed if sampling.seed >= 0 else UNSET_SEED,
        "temperature": sampling.temperature, "dynatemp_range": 0.0, "dynatemp_exponent": 1.0,
        "top_k": sampling.top_k, "top_p": sampling.top_p, "min_p": sampling.min_p, "top_n_sigma": -1.0,
        "xtc_probability": 0.0, "xtc_threshold": 0.1, "typical_p": 1.0,
        "repeat_last_n": sampling.repeat_last_n, "repeat_penalty": sampling.repeat_penalty,
        "presence_penalty": sampling.presence_penalty, "frequency_penalty": sampling.frequency_penalty,
        "dry_multiplier": 0.0, "dry_base": 1.75, "dry_allowed_length": 2, "dry_penalty_last_n": 64,
        "dry_sequence_breakers": ["\n", ":", '"', "*"],
        "mirostat": 0, "mirostat_tau": 5.0, "mirostat_eta": 0.1, "adaptive_target": -1.0, "adaptive_decay": 0.9,
        "stop": request.stop, "max_tokens": request.max_tokens, "n_predict": request.max_tokens,
        "n_keep": 0, "n_discard": 0, "ignore_eos": request.ignore_eos, "stream": body.stream,
        # A ban (-inf) is null, as llama-server's JSON writes it.
        "logit_bias": [{"bias": b if math.isfinite(b) else None, "token": t} for t, b in sampling.logit_bias.items()],
        "n_probs": n_probs, "min_keep": 0, "grammar": body.grammar or "", "grammar_lazy": False,
        "grammar_triggers": [], "preserved_tokens": [], "chat_format": "Content-only", "reasoning_format": "none",
        "reasoning_in_content": False, "generation_prompt": "",
        "samplers": ["penalties", "logit_bias", "top_k", "top_p", "min_p", "temperature"],
        "speculative.types": "none", "timings_per_token": False, "post_sampling_probs": False,
        "backend_sampling": False, "lora": [],
    }


# -- the answer ----------------------------------------------------------------------------------

@dataclass
class Result:
    """One choice of one prompt, as far as it has come."""

    index: int
    prompt: Prompt
    settings: dict[str, Any]
    parts: list[str] = field(default_factory=list)
    tokens: list[TokenLogprob] = field(default_factory=list)  # ids (and n_probs' numbers, if asked)
    done: Done | None = None

    def partial(self, delta: Delta, n_probs: int) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "index": self.index, "content": delta.text, "tokens": [e.token for e in delta.logprobs],
            "stop": False, "id_slot": -1, "tokens_predicted": len(self.tokens),
            "tokens_evaluated": len(self.prompt.tokens)}
        if n_probs:
            chunk["completion_probabilities"] = [chat_logprob(e) for e in delta.logprobs]
        return chunk

    def final(self, model: str, streamed: bool, return_tokens: bool, n_probs: int) -> dict[str, Any]:
        done = self.done
        assert done is not None
        text = "".join(self.parts)
        stop_type = "limit" if done.finish_reason == "length" else "word" if done.stop_word else "eos"
        result: dict[str, Any] = {
            "index": self.index,
            "content": "" if streamed else text,  # a stream sent it with the deltas
            "tokens": [e.token for e in self.tokens] if return_tokens and not streamed else [],
            "id_slot": done.slot,
            "stop": True,
            "model": model,
            "tokens_predicted": done.completion_tokens,
            "tokens_evaluated": done.prompt_tokens,
            "generation_settings": self.settings,
            "prompt": self.prompt.text,
            "has_new_line": "\n" in text,
            "truncated": False,  # a prompt that does not fit is refused, never cut
            "stop_type": stop_type,
            "stopping_word": done.stop_word,
            # What the slot's cache holds: the prompt and every token but the last (never fed).
            "tokens_cached": done.prompt_tokens + max(done.completion_tokens - 1, 0),
            "timings": done.timings(),
        }
        if n_probs and not streamed:
            result["completion_probabilities"] = [chat_logprob(e) for e in self.tokens]
        return result


async def merged_events(generations: Sequence[Generation]) -> AsyncIterator[tuple[int, Delta | Done | Failed]]:
    """Every generation's events as they come, with the generation's position; ends after a Failed."""
    if len(generations) == 1:
        async for event in generations[0].events_until_done():
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, Delta | Done | Failed | None]] = asyncio.Queue()

    async def pump(position: int, generation: Generation) -> None:
        async for event in generation.events_until_done():
            queue.put_nowait((position, event))
        queue.put_nowait((position, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    try:
        running = len(tasks)
        while running:
            position, item = await queue.get()
            if item is None:
                running -= 1
                continue
            yield position, item
            if isinstance(item, Failed):
                return
    finally:
        for task in tasks:
            task.cancel()


class NativeAnswer:
    """A planned /completion request's engine requests (one per prompt) and its results."""

    def __init__(self, runtime: ChildRuntime, body: NativeCompletionBody, plan: Plan, prompts: list[Prompt]) -> None:
        self.model = runtime.settings.alias
        self.body = body
        self.n_probs = plan.logprobs or 0
        # Token ids come with log-probabilities: asked for (the top 0) when a stream or
        # return_tokens needs the ids and n_probs did not ask already.
        logprobs = self.n_probs if self.n_probs else (0 if body.stream or body.return_tokens else None)
        self.generations = [Generation(runtime, body, p.tokens, False, plan.grammar, logprobs) for p in prompts]
        self.n = body.n
        self.results = [Result(i * self.n + c, p, generation_settings(g, body, self.n_probs))
                        for i, (p, g) in enumerate(zip(prompts, self.generations, strict=True)) for c in range(self.n)]

    def cancel(self) -> None:
        """Free every slot (at the scheduler's next step); harmless once they are done."""
        for generation in self.generations:
            generation.request.cancel()

    async def start(self) -> None:
        """Submit every prompt; a RequestError if one is refused (and the others are cancelled)."""
        try:
            await asyncio.gather(*(g.start() for g in self.generations))
        except BaseException:
            self.cancel()
            raise

    async def events(self) -> AsyncIterator[tuple[Result, Delta | Done] | Failed]:
        """Each event with the result it went to (recorded there), until all are done or one failed."""
        try:
            async for position, event in merged_events(self.generations):
                if isinstance(event, Failed):
                    yield event
                    return
                result = self.results[position * self.n + event.choice]
                if isinstance(event, Delta):
                    result.parts.append(event.text)
                    result.tokens.extend(event.logprobs)
                else:
                    result.done = event
                yield result, event
        finally:
            self.cancel()  # ended, failed or abandoned (the client left a stream)

    async def stream(self) -> AsyncIterator[bytes]:
        try:
            async for item in self.events():
                if isinstance(item, Failed):
                    yield sse(error_body(item.status, item.message, item.error_type))
                    return
                result, event = item
                yield sse(result.partial(event, self.n_probs) if isinstance(event, Delta)
                          else result.final(self.model, True, self.body.return_tokens, self.n_probs))
        finally:
            self.cancel()

    async def complete(self) -> Response:
        async for item in self.events():
            if isinstance(item, Failed):
                return error_response(item.status, item.message, item.error_type)
        if any(r.done is None for r in self.results):
            return error_response(500, "generation ended without a result")
        answers = [r.final(self.model, False, self.body.return_tokens, self.n_probs) for r in self.results]
        return JSONResponse(answers[0] if len(answers) == 1 else answers)


async def plan_native(runtime: ChildRuntime, body: NativeCompletionBody) -> NativeAnswer:
    """Everything settled before the engine sees it: the prompts' tokens, logit_bias by token id,
    then what /v1/completions settles (plan_completion: the grammar, `n` within the slots)."""
    if body.n_predict == 0:
        body.n_predict = 1  # llama-server samples one token all the same
    parts = prompt_parts(body.prompt)
    # Checked before any prompt is tokenized: each prompt and choice is a request of the engine's,
    # and thousands of them would hold the engine's thread and memory before its queue refused.
    most = runtime.settings.context.n_parallel + runtime.settings.max_queue
    if len(parts) * body.n > most:
        raise RequestError(f"{len(parts)} prompts x n={body.n} is more requests than this model takes at once "
                           f"({most}: its --parallel slots and --max-queue)")
    bias = bias_entries(body.logit_bias)
    prompts, by_token = await on_model(runtime, lambda m: tokenized(m, parts, bias))
    settled = body.model_copy(update={"prompt": prompts[0].tokens, "logit_bias": by_token})
    plan = await plan_completion(runtime, settled)
    return NativeAnswer(runtime, settled, plan, prompts)


def build_router(runtime: ChildRuntime) -> APIRouter:
    router = APIRouter()

    @router.post("/completion")
    async def completion(request: Request) -> Response:
        ensure_ready(runtime)
        with runtime.sessions.reserve(conversation_id_of(request)) as reservation:  # before the body is read
            body = parse_body(await request.body(), NativeCompletionBody)
            answer = await plan_native(runtime, body)
            if body.stream and reservation is not None:
                # Resumable (child/stream_sessions.py): it runs whether or not this client stays.
                await answer.start()
                refuse_if_deleted(runtime.sessions, reservation, answer.cancel)
                session = runtime.sessions.start(reservation, answer.stream())
                return StreamingResponse(session.follow(0), media_type="text/event-stream", headers=SSE_HEADERS)
        # A client that leaves while its request waits for a slot, or before a non-streamed answer
        # is written at its end, frees its slots.
        async with cancelled_if_client_leaves(request.scope, request.receive):
            await answer.start()
            if body.stream:
                return StreamingResponse(answer.stream(), media_type="text/event-stream", headers=SSE_HEADERS)
            return await answer.complete()

    return router
