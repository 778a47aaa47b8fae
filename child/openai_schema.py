"""OpenAI request bodies for the child, validated, and turned into engine requests.

Every malformed body becomes a RequestError, which the server renders as a 400 in the OpenAI error
shape; nothing a client sends can raise anything else.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from child.engine.sampling import SamplingParams
from child.openai_http import NotAJsonObject, json_object


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
    n: int = Field(default=1, ge=1, le=1)

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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise RequestError(f"content part of type {part.get('type')!r} is not supported "
                                   "(this model reads text only)")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionBody(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)

    def template_messages(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


class CompletionBody(GenerationBody):
    prompt: str | list[int] | list[str]

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
    try:
        data = json_object(raw)
    except NotAJsonObject as exc:
        raise RequestError(str(exc)) from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise RequestError(f"invalid '{where}': {first['msg']}") from exc
