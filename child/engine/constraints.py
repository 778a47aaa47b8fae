"""Constrained decoding: JSON schemas, GBNF / Lark grammars and tool-call formats, enforced token by
token, per slot, inside the continuous batch.

llguidance computes which tokens may come next for the text so far: a bitmask over the vocabulary
(about 40 us per token for SmolLM2's 49k tokens). The tokens it forbids get -inf in that slot's
logits before its sampler sees them, so a constrained slot and a free one share one llama_decode.
libllama's own grammar sampler was the other candidate; bench/constrained_decoding.py measured
both (README, "Structured output").

Compiling a client's schema is bounded (llguidance's parser limits: grammar size, lexer states,
work per token), so a hostile schema costs a 400, not the engine's time or memory. The limits do
not bound everything: a regex such as `a{100000}` passes them and costs 60 ms a mask. So the first
mask is computed when the schema is compiled, off the decode loop (a 400 if it is slow), and every
later one is timed: a request whose masks take over MASK_BUDGET_S fails rather than stall the batch.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import llama_cpp as llama
import llguidance
import numpy as np
from llguidance.llamacpp import lltokenizer_from_vocab

GrammarKind = Literal["json_schema", "lark", "gbnf"]

# llguidance's defaults, with the per-token work halved and terse errors (they go to the client).
LIMITS = llguidance.LLParserLimits(step_lexer_fuel=100_000, step_max_items=25_000, max_grammar_size=200_000,
                                   verbose_errors=False)


# One token's mask: usually 0.1-0.3 ms; a decode step of 8 sequences takes about 40 ms here. A
# mask of 20 ms already slows every slot of the batch by half.
MASK_BUDGET_S = 0.02
SLOW_MASKS_TO_FAIL = 3


class ConstraintError(ValueError):
    """The schema or grammar cannot be compiled; the message says which part and why."""


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar: a matcher at its start, which each slot that follows it copies."""

    matcher: llguidance.LLMatcher
    description: str  # for messages: "the JSON schema", "the grammar", "the tool calls", ...
    n_vocab: int

    def start(self) -> Constraint:
        """Cheap (a copy of compiled state): runs on the decode loop."""
        return Constraint(self.matcher.deep_copy(), self.n_vocab, self.description)


# JSON between its tokens may hold some whitespace, not any amount: a small model in a loop would
# otherwise fill max_tokens with newlines. (llama.cpp's converter bounds it the same way.)
JSON_OPTIONS: Any = {"whitespace_pattern": r"[ \t\n\r]{0,20}"}  # llguidance's JsonCompileOptions


def json_schema_grammar(schema: dict[str, Any] | bool) -> str:
    try:
        return str(llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS))
    except (ValueError, TypeError) as exc:
        raise ConstraintError(f"JSON schema conversion failed: {exc}") from exc


def inline_json(schema: dict[str, Any]) -> str:
    """A schema for llguidance's Lark `%json` (with the same options as json_schema_grammar)."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


def grammar_definition(kind: GrammarKind, text: str) -> str:
    try:
        return str(llguidance.grammar_from(kind, text))
    except (ValueError, TypeError) as exc:
        raise ConstraintError(f"{kind} grammar conversion failed: {exc}") from exc


class ConstraintCompiler:
    """Per model: the vocabulary llguidance needs, loaded on its own (vocab only, ~0.1 s, a few MB)
    so that it outlives the model's sleep and can be used from any thread. Building llguidance's
    token trie takes another ~0.35 s for SmolLM2: `for_model` does it once, on first use."""

    _instances: dict[str, ConstraintCompiler] = {}
    _instances_lock = threading.Lock()

    @classmethod
    def for_model(cls, model_path: str) -> ConstraintCompiler:
        """The compiler of this model file, made on first use (blocking: run it off the event loop)."""
        with cls._instances_lock:
            compiler = cls._instances.get(model_path)
            if compiler is None:
                compiler = cls._instances[model_path] = cls(model_path)
            return compiler

    def __init__(self, model_path: str) -> None:
        params = llama.llama_model_default_params()
        params.vocab_only = True
        self._vocab_model = llama.llama_model_load_from_file(model_path.encode(), params)
        if not self._vocab_model:
            raise RuntimeError(f"cannot load the vocabulary of {model_path}")
        vocab = llama.llama_model_get_vocab(self._vocab_model)
        self.n_vocab = int(llama.llama_vocab_n_tokens(vocab))
        self.tokenizer = lltokenizer_from_vocab(vocab)
        self._lock = threading.Lock()

    def compile(self, definition: str, description: str) -> Grammar:
        """Compile a grammar definition and compute its first mask (blocking: run it off the event
        loop); ConstraintError names what is wrong."""
        with self._lock:
            error = llguidance.LLMatcher.validate_grammar(definition, self.tokenizer, limits=LIMITS)
            if error:
                raise ConstraintError(f"{description} cannot be used: {error.strip()}")
            matcher = llguidance.LLMatcher(self.tokenizer, definition, limits=LIMITS, log_level=0)
        # The first mask, twice (a machine busy for a moment must not turn a good schema away).
        for _ in range(2):
            probe = Constraint(matcher.deep_copy(), self.n_vocab, description)
            probe.apply(np.zeros(self.n_vocab, dtype=np.float32))
            if probe.failed:
                raise ConstraintError(probe.failed)
            if probe.last_mask_s <= MASK_BUDGET_S:
                return Grammar(matcher, description, self.n_vocab)
        raise ConstraintError(f"{description} is too costly to follow: the allowed first tokens took "
                              f"{probe.last_mask_s * 1000:.0f} ms to compute (at most {MASK_BUDGET_S * 1000:.0f} ms)")


class Constraint:
    """One slot's grammar state: masks logits, follows the sampled tokens."""

    def __init__(self, matcher: llguidance.LLMatcher, n_vocab: int, description: str) -> None:
        self.matcher = matcher
        self.n_vocab = n_vocab
        self.description = description
        self._mask = np.zeros((n_vocab + 31) // 32, dtype=np.int32)
        self._allowed = np.ones(n_vocab, dtype=np.bool_)
        self._too_slow: str | None = None
        self._slow_in_row = 0
        self.last_mask_s = 0.0

    @property
    def failed(self) -> str | None:
        """Why the output can no longer follow the grammar, or None."""
        if self._too_slow is not None:
            return self._too_slow
        if self.matcher.is_error():
            return f"{self.description} cannot be followed: {self.matcher.get_error().strip()}"
        return None

    def apply(self, logits: np.ndarray) -> None:
        """Set every token the grammar does not allow next to -inf (in place)."""
        started = time.perf_counter()
        self.matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        self.last_mask_s = time.perf_counter() - started
        # Several slow masks in a row, not one: a shared machine can pause any single one.
        self._slow_in_row = self._slow_in_row + 1 if self.last_mask_s > MASK_BUDGET_S else 0
        if self._slow_in_row >= SLOW_MASKS_TO_FAIL:
            self._too_slow = (f"{self.description} is too costly to follow: the allowed next tokens took "
                              f"{self.last_mask_s * 1000:.0f} ms to compute (at most {MASK_BUDGET_S * 1000:.0f} ms)")
        self._allowed = np.unpackbits(self._mask.view(np.uint8), bitorder="little", count=self.n_vocab).view(np.bool_)
        _mask_out(logits[: self.n_vocab], self._allowed)

    def allows(self, token: int) -> bool:
        """Whether the last mask allowed `token` (a sampler left with no allowed token picks another)."""
        return 0 <= token < self.n_vocab and bool(self._allowed[token])

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but the end of the text may follow. (llguidance also
        stops on an error: `failed` is checked first.)"""
        return bool(self.matcher.is_stopped()) and not self.matcher.is_error()


def _mask_out(logits: np.ndarray, allowed: np.ndarray) -> None:
    """logits[~allowed] = -inf, by the shorter list of indices: a boolean-mask assignment over the
    whole vocabulary costs 100-200 us, this about 20 us when (as usual) few tokens are allowed, or
    few are not."""
    if np.count_nonzero(allowed) * 2 < len(allowed):
        keep = np.flatnonzero(allowed)
        kept = logits[keep]
        logits.fill(-np.inf)
        logits[keep] = kept
    else:
        logits[np.flatnonzero(~allowed)] = -np.inf
