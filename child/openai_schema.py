"""OpenAI request bodies for the child, validated, and turned into engine requests.

Every malformed body becomes a RequestError, which the server renders as a 400 in the OpenAI error
shape; nothing a client sends can raise anything else. A field the engine cannot honour is a 400
that names it: a 200 that silently ignored it would be an answer the client cannot use. Fields
that change nothing here are accepted (NO_OP_FIELDS), and llama-server's sampler fields are
accepted at the value that turns them off (NEUTRAL_FIELDS); the README lists both.
"""

from __future__ import annotations

import math
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from child.engine.next_token import MAX_TOP_LOGPROBS
from child.engine.sampling import SamplingParams
from child.openai_http import NotAJsonObject, json_object

# Accepted and without effect on this engine: bookkeeping for the client or OpenAI's platform,
# and hints whose absence changes no output.
NO_OP_FIELDS = frozenset({
    "user", "metadata", "store", "service_tier", "prediction", "reasoning_effort", "timings_per_token",
    "id_slot", "n_keep", "n_discard", "min_keep", "mirostat_tau", "mirostat_eta", "dry_base",
    "dry_allowed_length", "dry_penalty_last_n", "dry_sequence_breakers", "xtc_threshold",
    "dynatemp_exponent", "penalize_nl", "return_progress",
})
# llama-server's sampler settings this engine does not have, accepted at the value that turns them off.
NEUTRAL_FIELDS: dict[str, Any] = {
    "typical_p": 1.0, "tfs_z": 1.0, "mirostat": 0, "dry_multiplier": 0.0, "xtc_probability": 0.0,
    "top_n_sigma": -1.0, "dynatemp_range": 0.0, "post_sampling_probs": False, "return_tokens": False,
    "echo": False, "best_of": 1, "lora": [], "modalities": ["text"], "t_max_predict_ms": 0,
}


class RequestError(ValueError):
    def __init__(self, message: str, status: int = 400, error_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_type = error_type


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationBody(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions (plus llama-server's extras)."""

    model_config = ConfigDict(extra="allow")

    @classmethod
    def check_fields(cls, data: dict[str, Any]) -> None:
        """A 400 for a field this engine would have to ignore."""
        for name, value in data.items():
            if name in cls.model_fields or name in NO_OP_FIELDS:
                continue
            if name in NEUTRAL_FIELDS:
                if value != NEUTRAL_FIELDS[name] and value is not None:
                    raise RequestError(f"'{name}' is not supported by this engine (only {NEUTRAL_FIELDS[name]!r}, "
                                       "which changes nothing, is accepted)")
                continue
            raise RequestError(f"'{name}' is not supported by this engine")

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n_predict: int | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=5.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repeat_penalty: float | None = Field(default=None, gt=0.0)  # libllama: must be > 0
    repeat_last_n: int | None = Field(default=None, ge=-1)
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    cache_prompt: bool = True
    n: int = Field(default=1, ge=1, le=128)  # and at most the model's slots (-np): checked by the server

    @field_validator("n", mode="before")
    @classmethod
    def _n_null(cls, value: Any) -> Any:
        return 1 if value is None else value  # OpenAI's SDKs may send null for "not set"
    response_format: dict[str, Any] | None = None
    json_schema: dict[str, Any] | bool | None = None  # llama-server's field
    grammar: str | None = None  # llama-server's field: a GBNF grammar

    def grammar_source(self) -> tuple[Literal["json_schema", "gbnf"], Any] | None:
        """What the output must follow, from response_format, json_schema or grammar."""
        chosen: list[tuple[Literal["json_schema", "gbnf"], Any]] = []
        if self.response_format is not None:
            kind = self.response_format.get("type")
            if kind == "json_object":
                schema = self.response_format.get("schema")
                chosen.append(("json_schema", schema if isinstance(schema, dict) else {"type": "object"}))
            elif kind == "json_schema":
                spec = self.response_format.get("json_schema")
                schema = spec.get("schema") if isinstance(spec, dict) else None
                if not isinstance(schema, dict | bool):
                    raise RequestError("'response_format.json_schema.schema' must be a JSON schema")
                chosen.append(("json_schema", schema))
            elif kind not in ("text", None):
                raise RequestError(f"'response_format.type' must be \"text\", \"json_object\" or "
                                   f"\"json_schema\", not {kind!r}")
        if self.json_schema is not None:
            chosen.append(("json_schema", self.json_schema))
        if self.grammar is not None:
            chosen.append(("gbnf", self.grammar))
        if len(chosen) > 1:
            raise RequestError("give one of 'response_format' (json), 'json_schema' and 'grammar', not several")
        return chosen[0] if chosen else None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 16:
            raise ValueError("at most 16 stop strings")
        return value

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def wants_usage_chunk(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self, default: int) -> int:
        for value in (self.max_completion_tokens, self.max_tokens, self.n_predict):
            if value is not None:
                if value == -1:
                    return -1
                if value < 1:
                    raise RequestError("max_tokens must be at least 1 (or -1 for no limit)")
                return value
        return default

    def sampling(self, defaults: SamplingParams, n_vocab: int | None) -> SamplingParams:
        bias: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                token = int(key)
            except ValueError as exc:
                raise RequestError(f"logit_bias keys must be token ids, not {key!r}") from exc
            if token < 0 or (n_vocab is not None and token >= n_vocab):
                raise RequestError(f"logit_bias token {token} is outside the vocabulary")
            if math.isnan(value) or value == math.inf:  # -inf bans the token, as in llama-server
                raise RequestError(f"logit_bias of token {token} must be a number or -Infinity, not {value}")
            bias[token] = float(value)

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        return SamplingParams(
            temperature=pick(self.temperature, defaults.temperature),
            top_k=pick(self.top_k, defaults.top_k),
            top_p=pick(self.top_p, defaults.top_p),
            min_p=pick(self.min_p, defaults.min_p),
            seed=pick(self.seed, defaults.seed),
            repeat_penalty=pick(self.repeat_penalty, defaults.repeat_penalty),
            repeat_last_n=pick(self.repeat_last_n, defaults.repeat_last_n),
            presence_penalty=pick(self.presence_penalty, 0.0),
            frequency_penalty=pick(self.frequency_penalty, 0.0),
            logit_bias=bias,
        )


# What a client sends back when it appends an earlier answer to the history: informational, or
# empty; anything else in a message is refused by name.
MESSAGE_NO_OP_FIELDS = frozenset({"refusal", "annotations", "function_call", "audio"})


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # llama-server's name for an assistant's thinking

    def check_fields(self, where: str) -> None:
        for name, value in (self.model_extra or {}).items():
            if name in MESSAGE_NO_OP_FIELDS and (value in (None, [], "") or name in ("refusal", "annotations")):
                continue
            raise RequestError(f"'{where}.{name}' is not supported by this engine")

    def text(self, where: str) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for i, part in enumerate(self.content):
            kind = part.get("type")
            if kind in ("image_url", "input_image", "input_audio", "file", "audio"):
                raise RequestError(f"'{where}.content[{i}]' is {kind!r}: this model reads text only (it has "
                                   "no multimodal projector)")
            if kind != "text":
                raise RequestError(f"'{where}.content[{i}]' has type {kind!r}; expected 'text'")
            parts.append(str(part.get("text", "")))
        return "".join(parts)

    def check_tool_calls(self, where: str) -> None:
        """An earlier answer's calls, as OpenAI sends them back: each {"id", "type": "function",
        "function": {"name", "arguments"}} (the template and the generic prompt read them)."""
        for i, call in enumerate(self.tool_calls or []):
            function = call.get("function")
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise RequestError(f"'{where}.tool_calls[{i}].function' must be {{\"name\": ..., \"arguments\": ...}}")
            if not isinstance(function.get("arguments", ""), str | dict):
                raise RequestError(f"'{where}.tool_calls[{i}].function.arguments' must be a JSON text")

    def template_message(self, where: str) -> dict[str, Any]:
        self.check_fields(where)
        self.check_tool_calls(where)
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": self.text(where)}
        for key in ("name", "tool_calls", "tool_call_id", "reasoning_content"):
            value = getattr(self, key)
            if value is not None:
                message[key] = value
        return message


class ChatCompletionBody(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # default: false, as llama-server (OpenAI: true)
    chat_template_kwargs: dict[str, Any] | None = None  # llama-server's: extra template variables

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.template_message(f"messages[{i}]") for i, m in enumerate(self.messages)]

    def logprobs_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("'top_logprobs' requires 'logprobs' to be true")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionBody(GenerationBody):
    prompt: str | list[StrictInt] | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # the legacy API's: N best per token
    n_probs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # llama-server's name for it

    def logprobs_count(self) -> int | None:
        return self.n_probs if self.n_probs is not None else self.logprobs

    def prompt_value(self) -> str | list[int]:
        if isinstance(self.prompt, list):
            if not self.prompt:
                raise RequestError("prompt must not be empty")
            if all(isinstance(p, str) for p in self.prompt):
                if len(self.prompt) != 1:
                    raise RequestError("only one prompt per request is supported")
                return str(self.prompt[0])
            return [int(p) for p in self.prompt]
        return self.prompt


class TokenizeBody(BaseModel):
    content: str
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeBody(BaseModel):
    tokens: list[int]


BodyT = TypeVar("BodyT", bound=BaseModel)


def parse_body(raw: bytes, model: type[BodyT]) -> BodyT:
    return validate_body(body_object(raw), model)


def body_object(raw: bytes) -> dict[str, Any]:
    """The body's JSON object, or a 400 that says what is wrong."""
    try:
        return json_object(raw)
    except NotAJsonObject as exc:
        raise RequestError(str(exc)) from exc


def refuse_unknown_keys(part: dict[str, Any], allowed: set[str], where: str,
                        ignored: frozenset[str] = frozenset()) -> None:
    """A 400 for a key of a nested object this engine would ignore. An empty value is none: SDKs
    send back the blocks and items they received with every field they know, most of them null."""
    for key, value in part.items():
        if key not in allowed and key not in ignored and value not in (None, [], {}):
            raise RequestError(f"'{where}.{key}' is not supported by this engine")


def validate_body(data: dict[str, Any], model: type[BodyT]) -> BodyT:
    """A decoded body as `model`; a RequestError names the first field that is wrong."""
    if issubclass(model, GenerationBody):
        model.check_fields(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise RequestError(f"invalid '{where}': {first['msg']}") from exc
