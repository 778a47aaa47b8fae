"""Choosing a slot's next token from the logits of one decode: the log-probabilities asked for
(from the raw logits), the constraint's mask, then the slot's sampler.

The order matters. Log-probabilities are those of the model itself, before temperature, top-k/p,
penalties or any grammar, as llama-server reports them; they are read first. The constraint then
sets the tokens its grammar forbids to -inf in place, and the sampler (libllama's chain, or the
greedy argmax) picks among what is left. The chosen token is always allowed, so its raw logit is
still there to read afterwards.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import llama_cpp as llama
import numpy as np

from child.engine.llama_model import LlamaModel
from child.engine.requests import TokenLogprob

# llama-server has no limit on top_logprobs; OpenAI allows 20. Computing more costs a sort.
MAX_TOP_LOGPROBS = 20


def logits_at(ctx: ctypes.c_void_p, index: int, n_vocab: int) -> np.ndarray:
    """The logits of the token at `index` in the last batch: a writable view, not a copy."""
    return np.ctypeslib.as_array(llama.llama_get_logits_ith(ctx, index), shape=(n_vocab,))


@dataclass(frozen=True)
class LogprobBasis:
    """What every token's log-probability at one position derives from."""

    log_sum_exp: float
    top: tuple[tuple[int, float], ...]  # (token, logprob), most likely first

    @classmethod
    def of(cls, logits: np.ndarray, top_n: int) -> LogprobBasis:
        peak = float(logits.max())
        log_sum_exp = peak + float(np.log(np.exp(logits.astype(np.float64) - peak).sum()))
        top: tuple[tuple[int, float], ...] = ()
        if top_n > 0:
            best = np.argpartition(-logits, top_n - 1)[:top_n]
            best = best[np.argsort(-logits[best], kind="stable")]
            top = tuple((int(t), float(logits[t]) - log_sum_exp) for t in best)
        return cls(log_sum_exp, top)


def token_logprob(model: LlamaModel, logits: np.ndarray, basis: LogprobBasis, token: int) -> TokenLogprob:
    """The record of a sampled token (its raw logit is untouched by any mask: it was allowed)."""
    return TokenLogprob(token=token, piece=model.token_piece(token, special=True),
                        logprob=float(logits[token]) - basis.log_sum_exp,
                        top=tuple((t, model.token_piece(t, special=True), lp) for t, lp in basis.top))
