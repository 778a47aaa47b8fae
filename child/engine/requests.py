"""What flows between the HTTP side and the scheduler thread: a request and its events."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from child.engine.constraints import Grammar
from child.engine.sampling import SamplingParams

_ids = itertools.count(1)


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability under the raw logits (before any sampling transform or
    constraint, as llama-server reports it), and the most likely tokens at that position."""

    token: int
    piece: bytes
    logprob: float
    top: tuple[tuple[int, bytes, float], ...]  # (token, piece, logprob), most likely first


@dataclass(frozen=True)
class Accepted:
    """The prompt was tokenized and fits; generation will follow."""

    prompt_tokens: int


@dataclass(frozen=True)
class Delta:
    text: str
    choice: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens sampled since the previous delta


@dataclass(frozen=True)
class Done:
    """One choice has ended (a request with n choices ends with n of these)."""

    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    prompt_ms: float
    predicted_ms: float
    choice: int = 0
    stop_word: str = ""  # the stop string that ended it ("" for an end-of-generation token or a limit)
    slot: int = -1  # the slot it ran in

    def timings(self) -> dict[str, float | int]:
        """llama-server's `timings` object."""
        prompt_n = self.prompt_tokens - self.cached_tokens
        return {
            "cache_n": self.cached_tokens,
            "prompt_n": prompt_n,
            "prompt_ms": round(self.prompt_ms, 3),
            "prompt_per_token_ms": round(self.prompt_ms / prompt_n, 3) if prompt_n else 0.0,
            "prompt_per_second": round(prompt_n * 1000.0 / self.prompt_ms, 3) if self.prompt_ms else 0.0,
            "predicted_n": self.completion_tokens,
            "predicted_ms": round(self.predicted_ms, 3),
            "predicted_per_token_ms": (
                round(self.predicted_ms / self.completion_tokens, 3) if self.completion_tokens else 0.0),
            "predicted_per_second": (
                round(self.completion_tokens * 1000.0 / self.predicted_ms, 3) if self.predicted_ms else 0.0),
        }


@dataclass(frozen=True)
class Failed:
    message: str
    status: int  # the HTTP status the error maps to (400 for a bad prompt, 500 otherwise)
    error_type: str = "server_error"


EngineEvent = Accepted | Delta | Done | Failed


@dataclass
class GenerationRequest:
    """A completion to run. `sink` is called from the scheduler thread and must be thread-safe."""

    prompt: str | list[int]
    sampling: SamplingParams
    max_tokens: int  # -1 = until the slot's context is full
    stop: list[str]
    sink: Callable[[EngineEvent], None]
    ignore_eos: bool = False
    cache_prompt: bool = True
    add_special: bool = True  # add BOS as the model asks; False when a chat template already did
    grammar: Grammar | None = None  # every choice's text must follow it
    logprobs: int | None = None  # None: none; N: each token's log-probability and the N most likely
    n: int = 1  # choices, each in a slot of its own, sharing one prompt evaluation
    id: int = field(default_factory=lambda: next(_ids))
    created: float = field(default_factory=time.time)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()
