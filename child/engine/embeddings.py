"""Embeddings: a second llama_context on the loaded model, made for pooled embeddings.

llama-server turns its one context into an embedding context with `--embeddings`; here the
generation context stays as it is and the embedding one exists beside it, so one child serves
both. Inputs are packed several sequences to a llama_decode (the scheduler gathers them across
concurrent requests), and each sequence's pooled vector is read back. Pooling: `--pooling`, else
what the GGUF says, else mean (a chat model's GGUF usually says nothing, and "none" gives no
single vector per input).

Only the scheduler thread touches it, like the model; it goes when the model sleeps.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import llama_cpp as llama
import numpy as np

from child.engine.llama_model import LlamaModel, add_to_batch

POOLING = {"none": llama.LLAMA_POOLING_TYPE_NONE, "mean": llama.LLAMA_POOLING_TYPE_MEAN,
           "cls": llama.LLAMA_POOLING_TYPE_CLS, "last": llama.LLAMA_POOLING_TYPE_LAST,
           "rank": llama.LLAMA_POOLING_TYPE_RANK}
POOLING_NAMES = {value: name for name, value in POOLING.items()}
MAX_SEQUENCES = 32  # inputs per llama_decode


class EmbeddingError(ValueError):
    pass


@dataclass(frozen=True)
class EmbeddingSettings:
    enabled: bool
    pooling: str | None  # None: the GGUF's, else mean
    batch_tokens: int  # the most tokens of one llama_decode, and so of one input
    n_threads: int


class EmbeddingContext:
    def __init__(self, model: LlamaModel, settings: EmbeddingSettings) -> None:
        self.model = model
        self.batch_tokens = settings.batch_tokens
        self.pooling = self._pooling(settings.pooling)
        params = llama.llama_context_default_params()
        params.embeddings = True
        params.pooling_type = POOLING[self.pooling]
        # One pool of cells for all sequences of a batch; all of one sequence's tokens in one
        # micro-batch (pooling over a sequence needs them together).
        params.n_ctx = params.n_batch = params.n_ubatch = settings.batch_tokens
        params.n_seq_max = MAX_SEQUENCES
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = settings.n_threads
        params.no_perf = True
        self.ctx = llama.llama_init_from_model(model.model, params)
        if not self.ctx:
            raise EmbeddingError("libllama could not create an embedding context")
        self.memory = llama.llama_get_memory(self.ctx)
        self.n_embd = model.n_embd
        self._batch = llama.llama_batch_init(settings.batch_tokens, 0, MAX_SEQUENCES)

    def _pooling(self, asked: str | None) -> str:
        if asked == "rank":
            raise EmbeddingError("pooling 'rank' scores query-document pairs of a reranker (/rerank, not "
                                 "served here); use mean, cls, last or none for embeddings")
        if asked is not None:
            if asked not in POOLING:
                raise EmbeddingError(f"--pooling must be one of {', '.join(POOLING)}, not {asked!r}")
            return asked
        arch = self.model.meta_str("general.architecture") or "llama"
        from_gguf = self.model.meta_str(f"{arch}.pooling_type")
        if from_gguf is not None and from_gguf.isdigit() and int(from_gguf) in POOLING_NAMES:
            name = POOLING_NAMES[int(from_gguf)]
            if name not in ("none", "rank"):
                return name
        return "mean"

    def embed(self, inputs: list[list[int]]) -> list[np.ndarray]:
        """One vector per input (pooling "none": one row per token), in input order; all of them
        in one llama_decode, so at most MAX_SEQUENCES inputs of batch_tokens tokens together."""
        if len(inputs) > MAX_SEQUENCES or sum(len(tokens) for tokens in inputs) > self.batch_tokens:
            raise EmbeddingError("more inputs than one embedding batch holds")
        n = 0
        starts: list[int] = []
        for seq, tokens in enumerate(inputs):  # each one checked by the route (check_input)
            starts.append(n)
            n = add_to_batch(self._batch, n, seq, 0, tokens, logits_for_last=True)
            if self.pooling == "none":  # every token's vector is read, not one pooled one
                for i in range(starts[-1], n):
                    self._batch.logits[i] = True
        self._batch.n_tokens = n
        llama.llama_memory_clear(self.memory, True)
        if llama.llama_decode(self.ctx, self._batch) != 0:
            raise EmbeddingError("decoding the embedding batch failed")
        if self.pooling == "none":
            return [np.stack([self._row(llama.llama_get_embeddings_ith(self.ctx, first + i))
                              for i in range(len(tokens))])
                    for first, tokens in zip(starts, inputs, strict=True)]
        return [self._row(llama.llama_get_embeddings_seq(self.ctx, seq)) for seq in range(len(inputs))]

    def _row(self, pointer: ctypes._Pointer) -> np.ndarray:  # type: ignore[type-arg]
        if not pointer:
            raise EmbeddingError("libllama gave no embedding for an input")
        return np.ctypeslib.as_array(pointer, shape=(self.n_embd,)).copy()

    def close(self) -> None:
        if self.ctx:
            llama.llama_batch_free(self._batch)
            llama.llama_free(self.ctx)
            self.ctx = None


def check_input(tokens: list[int], batch_tokens: int) -> None:
    """An input must fit one micro-batch: pooling needs all of its tokens together."""
    if not 0 < len(tokens) <= batch_tokens:
        raise EmbeddingError(f"an input of {len(tokens)} tokens: each must be 1 to {batch_tokens} tokens "
                             "(the physical batch size, --batch-size / --ubatch-size)")


def normalize(vector: np.ndarray, kind: int) -> np.ndarray:
    """llama-server's `embd_normalize`: -1 none, 0 max absolute, 1 taxicab, 2 euclidean (its
    default), p > 2 the p-norm."""
    if kind < 0:
        return vector
    if kind == 0:
        norm = float(np.abs(vector).max()) / 32760.0
    elif kind == 2:
        norm = float(np.sqrt(np.square(vector.astype(np.float64)).sum()))
    else:
        norm = float((np.abs(vector.astype(np.float64)) ** kind).sum() ** (1.0 / kind))
    return vector / norm if norm > 0 else vector
