"""Everything one child process serves: the settings, the loaded model, its scheduler and template.

Loading happens off the event loop (the HTTP server already answers /health with 503 meanwhile);
the model then belongs to the scheduler thread.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from child.engine.chat_template import ChatTemplate, ChatTemplateError, resolve_template_source
from child.engine.embeddings import EmbeddingSettings
from child.engine.llama_model import BUILD_INFO, ContextSettings, LlamaModel, default_threads
from child.engine.sampling import SamplingParams
from child.engine.scheduler import Scheduler
from child.protocol import ChildState
from child.router_link import RouterLink
from child.stream_sessions import SessionStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSettings:
    model_path: str
    alias: str
    context: ContextSettings
    default_max_tokens: int
    default_sampling: SamplingParams
    chat_template: str | None
    chat_template_file: str | None
    sleep_idle_s: float
    batch_window_s: float
    max_queue: int
    stream_buffer_bytes: int
    stream_ttl_s: float
    embeddings: EmbeddingSettings

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeSettings:
        threads = args.threads if args.threads > 0 else default_threads()
        threads_batch = args.threads_batch if args.threads_batch > 0 else threads
        alias = (args.alias or "").split(",")[0].strip() or Path(args.model).stem
        if args.parallel < 1:
            raise ValueError("--parallel must be at least 1")
        if args.batch_size < args.parallel:
            # Every slot puts one token in each batch; a batch over n_batch aborts inside GGML.
            raise ValueError(f"--batch-size ({args.batch_size}) must be at least --parallel ({args.parallel})")
        return cls(
            model_path=args.model,
            alias=alias,
            context=ContextSettings(
                n_ctx=args.ctx_size, n_parallel=args.parallel, n_batch=args.batch_size,
                n_ubatch=args.ubatch_size, n_threads=threads, n_threads_batch=threads_batch,
                flash_attn=args.flash_attn, kv_unified=args.kv_unified,
            ),
            default_max_tokens=args.n_predict,
            default_sampling=SamplingParams(
                temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                seed=args.seed, repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
            ),
            chat_template=args.chat_template,
            chat_template_file=args.chat_template_file,
            sleep_idle_s=args.sleep_idle_seconds,
            batch_window_s=args.batch_window_ms / 1000.0,
            max_queue=args.max_queue,
            stream_buffer_bytes=args.stream_buffer_bytes,
            stream_ttl_s=args.stream_ttl_seconds,
            embeddings=EmbeddingSettings(enabled=args.embeddings, pooling=args.pooling,
                                         batch_tokens=max(args.batch_size, 512), n_threads=threads_batch),
        )


class ChildRuntime:
    def __init__(self, settings: ServeSettings, link: RouterLink) -> None:
        self.settings = settings
        self.link = link
        self.state = ChildState.LOADING
        self.port = 0
        self.created = int(time.time())
        self.info: dict[str, Any] = {}
        self.scheduler: Scheduler | None = None
        self.template: ChatTemplate | None = None
        self.template_source: str | None = None
        self.n_vocab: int | None = None
        self.said_generic_tools = False  # the log says once that tools go through a generic prompt
        self.sessions = SessionStore(settings.stream_buffer_bytes, settings.stream_ttl_s)
        self._last_progress_sent = -1.0
        self._progress_lock = threading.Lock()

    # -- loading --------------------------------------------------------------------------------

    def _report_progress(self, value: float) -> None:
        with self._progress_lock:
            # libllama calls back once per tensor; report in 10 % steps.
            if value - self._last_progress_sent >= 0.1 or (value >= 1.0 > self._last_progress_sent):
                self._last_progress_sent = value
                self.link.announce(ChildState.LOADING, {
                    "stages": ["text_model"], "current": "text_model", "value": round(value, 3)})

    def _load_model(self, progress: Callable[[float], None] | None = None) -> LlamaModel:
        started = time.monotonic()
        model = LlamaModel(self.settings.model_path, self.settings.context, progress)
        log.info("loaded %s in %.2f s (n_ctx %d, %d slots of %d tokens; %s)", self.settings.model_path,
                 time.monotonic() - started, model.n_ctx, self.settings.context.n_parallel,
                 model.n_ctx_slot, BUILD_INFO)
        return model

    def load(self) -> None:
        """Load the model and start the scheduler (blocking; run it off the event loop)."""
        self._report_progress(0.0)
        model = self._load_model(self._report_progress)
        source = resolve_template_source(self.settings.chat_template, self.settings.chat_template_file,
                                         model.meta_str("tokenizer.chat_template"))
        if source is not None:
            try:
                self.template = ChatTemplate(source, model.special_token_text("bos"),
                                             model.special_token_text("eos"))
                self.template_source = source
            except ChatTemplateError as exc:
                log.warning("chat template unusable, /v1/chat/completions is off: %s", exc)
        self.n_vocab = model.n_vocab
        self.info = model.info()
        self.info["chat_template"] = self.template is not None
        self.scheduler = Scheduler(
            model, self._load_model,
            batch_window_s=self.settings.batch_window_s, max_queue=self.settings.max_queue,
            sleep_idle_s=self.settings.sleep_idle_s, on_sleep=self._on_sleep, on_wake=self._on_wake,
            embedding_settings=self.settings.embeddings if self.settings.embeddings.enabled else None,
        )
        self.scheduler.start()

    def mark_ready(self, port: int) -> None:
        self.port = port
        self.state = ChildState.READY
        self.link.announce(ChildState.READY, {"port": port, "alias": self.settings.alias, **self.info})

    def _on_sleep(self) -> None:
        self.state = ChildState.SLEEPING
        self.link.announce(ChildState.SLEEPING, {})

    def _on_wake(self) -> None:
        self.state = ChildState.READY
        self.link.announce(ChildState.READY, {})

    def shutdown(self) -> None:
        self.sessions.close()
        if self.scheduler is not None:
            self.scheduler.stop()
