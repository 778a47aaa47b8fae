"""One GGUF model and its llama_context, through llama-cpp-python's low-level libllama bindings.

Everything that touches libllama pointers for loading, tokenizing and metadata lives here; the
scheduler owns the decode loop. Not thread-safe: only the scheduler thread calls into it once loaded.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp as llama

log = logging.getLogger(__name__)

_backend_ready = False

# ggml log levels (ggml.h): 1 debug, 2 info, 3 warn, 4 error, 5 continuation of the previous line.
_GGML_WARN, _GGML_ERROR, _GGML_CONT = 3, 4, 5
_log_state = {"verbose": False, "last_level": 0}

# Which libllama this is: "llama-cpp-python 0.3.36+modelyard.<hash>" when scripts/build-libllama.sh
# built it with modelyard's ggml patches, plain "llama-cpp-python 0.3.36" for the upstream wheel.
BUILD_INFO = f"llama-cpp-python {llama.__version__}"


@llama.llama_log_callback
def _libllama_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    """libllama's log on stderr: warnings and errors, everything with --verbose."""
    if level != _GGML_CONT:
        _log_state["last_level"] = level
    shown = _log_state["verbose"] or _log_state["last_level"] in (_GGML_WARN, _GGML_ERROR)
    if shown:
        sys.stderr.write(text.decode("utf-8", errors="replace"))


def set_libllama_verbose(verbose: bool) -> None:
    _log_state["verbose"] = verbose


class ModelLoadError(RuntimeError):
    pass


@dataclass(frozen=True)
class ContextSettings:
    n_ctx: int  # total cells across slots; 0 = the model's training context
    n_parallel: int
    n_batch: int
    n_ubatch: int
    n_threads: int
    n_threads_batch: int
    flash_attn: str  # "on" | "off" | "auto"
    kv_unified: bool


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        llama.llama_log_set(_libllama_log, ctypes.c_void_p(0))
        llama.llama_backend_init()
        _backend_ready = True


def _flash_attn_type(value: str) -> int:
    table = {
        "on": llama.LLAMA_FLASH_ATTN_TYPE_ENABLED,
        "off": llama.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        "auto": llama.LLAMA_FLASH_ATTN_TYPE_AUTO,
    }
    if value not in table:
        raise ModelLoadError(f"--flash-attn must be on, off or auto, not {value!r}")
    return table[value]


class LlamaModel:
    """A loaded model plus one context with `n_parallel` sequences (seq ids 0..n_parallel-1)."""

    def __init__(self, path: str, settings: ContextSettings,
                 progress: Callable[[float], None] | None = None) -> None:
        _init_backend()
        if not Path(path).is_file():
            raise ModelLoadError(f"model file not found: {path}")
        self.path = path
        self.settings = settings
        model_params = llama.llama_model_default_params()
        # Keep the callback object alive while the load runs: ctypes does not hold a reference.
        self._progress_cb: Any = None
        if progress is not None:
            def on_progress(value: float, _user: ctypes.c_void_p) -> bool:
                progress(float(value))
                return True

            self._progress_cb = llama.llama_progress_callback(on_progress)
            model_params.progress_callback = self._progress_cb
        self.model = llama.llama_model_load_from_file(path.encode(), model_params)
        if not self.model:
            raise ModelLoadError(f"libllama could not load {path} (not a valid GGUF model?)")
        self.vocab = llama.llama_model_get_vocab(self.model)
        self.n_vocab = int(llama.llama_vocab_n_tokens(self.vocab))
        self.n_embd = int(llama.llama_model_n_embd(self.model))
        self.n_ctx_train = int(llama.llama_model_n_ctx_train(self.model))

        ctx_params = llama.llama_context_default_params()
        n_ctx = settings.n_ctx if settings.n_ctx > 0 else self.n_ctx_train
        ctx_params.n_ctx = n_ctx
        ctx_params.n_batch = settings.n_batch
        ctx_params.n_ubatch = min(settings.n_ubatch, settings.n_batch)
        ctx_params.n_seq_max = settings.n_parallel
        ctx_params.n_threads = settings.n_threads
        ctx_params.n_threads_batch = settings.n_threads_batch
        ctx_params.kv_unified = settings.kv_unified
        ctx_params.flash_attn_type = _flash_attn_type(settings.flash_attn)
        ctx_params.no_perf = True
        self.ctx = llama.llama_init_from_model(self.model, ctx_params)
        if not self.ctx:
            llama.llama_model_free(self.model)
            raise ModelLoadError(f"libllama could not create a context of {n_ctx} tokens")
        self.n_ctx = int(llama.llama_n_ctx(self.ctx))
        self.n_batch = int(llama.llama_n_batch(self.ctx))
        self.n_ctx_slot = self.n_ctx if settings.kv_unified else self.n_ctx // settings.n_parallel
        self.memory = llama.llama_get_memory(self.ctx)
        self.add_bos = bool(llama.llama_vocab_get_add_bos(self.vocab))
        self._piece_cache: dict[int, bytes] = {}

    # -- metadata -------------------------------------------------------------------------------

    def meta_str(self, key: str) -> str | None:
        size = 1 << 16
        buf = ctypes.create_string_buffer(size)
        n = llama.llama_model_meta_val_str(self.model, key.encode(), buf, size)
        if n < 0:
            return None
        return buf.value.decode("utf-8", errors="replace")

    def token_text(self, token: int) -> str:
        return self.token_piece(token, special=True).decode("utf-8", errors="replace")

    def info(self) -> dict[str, Any]:
        """What the `ready` protocol payload and /props report about the model."""
        template = self.meta_str("tokenizer.chat_template")
        return {
            "model_path": self.path,
            "n_ctx": self.n_ctx,
            "n_ctx_slot": self.n_ctx_slot,
            "n_ctx_train": self.n_ctx_train,
            "n_params": int(llama.llama_model_n_params(self.model)),
            "size": int(llama.llama_model_size(self.model)),
            "n_vocab": self.n_vocab,
            "n_parallel": self.settings.n_parallel,
            "chat_template": template is not None,
            "architecture": self.meta_str("general.architecture"),
            "name": self.meta_str("general.name") or Path(self.path).stem,
        }

    # -- tokens ---------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 16
        tokens = (llama.llama_token * capacity)()
        n = llama.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_special, parse_special)
        if n < 0:
            capacity = -n
            tokens = (llama.llama_token * capacity)()
            n = llama.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_special,
                                     parse_special)
        return list(tokens[:n])

    def token_piece(self, token: int, special: bool = False) -> bytes:
        """The bytes a token stands for (may be part of a UTF-8 character)."""
        if not special and token in self._piece_cache:
            return self._piece_cache[token]
        buf = ctypes.create_string_buffer(64)
        n = llama.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        piece = buf.raw[:n]
        if not special:
            self._piece_cache[token] = piece
        return piece

    def is_eog(self, token: int) -> bool:
        return bool(llama.llama_vocab_is_eog(self.vocab, token))

    def special_token_text(self, which: str) -> str:
        token = {"bos": llama.llama_vocab_bos, "eos": llama.llama_vocab_eos}[which](self.vocab)
        return self.token_text(token) if token >= 0 else ""

    # -- KV cache -------------------------------------------------------------------------------

    def forget(self, seq_id: int, from_pos: int = 0) -> None:
        """Drop the cells of `seq_id` at positions >= from_pos."""
        llama.llama_memory_seq_rm(self.memory, seq_id, from_pos, -1)

    def close(self) -> None:
        if self.ctx:
            llama.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama.llama_model_free(self.model)
            self.model = None


def add_to_batch(batch: Any, n: int, seq_id: int, pos: int, tokens: Sequence[int],
                 logits_for_last: bool) -> int:
    """Write `tokens` of one sequence at positions pos, pos+1, ... into `batch` from index n on;
    returns the next free index (the caller sets batch.n_tokens once the batch is complete).
    `batch` is a llama_batch; typed Any since the bindings type its seq_id field as a flat array."""
    for i, token in enumerate(tokens):
        batch.token[n + i] = token
        batch.pos[n + i] = pos + i
        batch.n_seq_id[n + i] = 1
        batch.seq_id[n + i][0] = seq_id
        batch.logits[n + i] = logits_for_last and i == len(tokens) - 1
    return n + len(tokens)


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))
