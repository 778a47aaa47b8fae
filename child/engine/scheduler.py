"""The continuous-batching decode loop.

One thread owns the llama_context. Each step puts into one llama_batch the next token of every
generating slot and chunks of the prompts being prefilled (chunked prefill, capped at n_batch: a
larger batch aborts the process inside GGML). New requests join between steps; finished and
cancelled ones leave at once. Slots enter the batch in ascending seq-id order and a new request
takes the lowest free seq id, which keeps libllama from splitting the batch into extra passes.

The same thread frees the model after `sleep_idle_s` without work and loads it again when the next
request arrives, so no other thread ever sees a freed context.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import llama_cpp as llama
import numpy as np

from child.engine.embedding_queue import EmbeddingQueue, EmbedJob
from child.engine.embeddings import EmbeddingContext, EmbeddingError, EmbeddingSettings
from child.engine.llama_model import LlamaModel, add_to_batch
from child.engine.next_token import LogprobBasis, logits_at, token_logprob
from child.engine.requests import Accepted, Delta, Done, Failed, GenerationRequest, TokenLogprob
from child.engine.sampling import Sampler
from child.engine.slots import EngineStats, Slot, common_prefix
from child.engine.text_output import TextAssembler

log = logging.getLogger(__name__)


EXIT_ENGINE_FAILED = 4
EMBED_TOKENS_WHILE_GENERATING = 64  # the most embedding tokens decoded between two generation steps
T = TypeVar("T")


class QueueFull(RuntimeError):
    pass


class EngineStopped(RuntimeError):
    pass


class Scheduler:
    """Runs generation requests on a model. `submit` is safe from any thread."""

    def __init__(self, model: LlamaModel, reload_model: Callable[[], LlamaModel], *,
                 batch_window_s: float, max_queue: int, sleep_idle_s: float,
                 on_sleep: Callable[[], None], on_wake: Callable[[], None],
                 embedding_settings: EmbeddingSettings | None = None) -> None:
        self.model: LlamaModel | None = model
        self.embedding_settings = embedding_settings
        self._embedder: EmbeddingContext | None = None  # made on the first embeddings, dropped on sleep
        self._embeddings = EmbeddingQueue()
        self._reload_model = reload_model
        self.n_parallel = model.settings.n_parallel
        self.n_ctx_slot = model.n_ctx_slot
        self.n_batch = model.n_batch
        self.batch_window_s = batch_window_s
        self.max_queue = max_queue
        self.sleep_idle_s = sleep_idle_s
        self._on_sleep = on_sleep
        self._on_wake = on_wake
        self.slots = [Slot(seq_id=i) for i in range(self.n_parallel)]
        self.stats = EngineStats()
        self._incoming: collections.deque[GenerationRequest] = collections.deque()
        self._calls: list[tuple[Callable[[LlamaModel], object], concurrent.futures.Future[object]]] = []
        self._waiting: collections.deque[tuple[GenerationRequest, list[int]]] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._last_activity = time.monotonic()
        self._batch = llama.llama_batch_init(self.n_batch, 0, self.n_parallel)
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)

    # -- public side ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: GenerationRequest) -> None:
        with self._cv:
            if self._stopping or not self._thread.is_alive():
                raise EngineStopped("the server is shutting down")
            # Only requests that find no free slot wait in the queue.
            free_slots = sum(1 for s in self.slots if s.request is None)
            if len(self._incoming) + len(self._waiting) >= self.max_queue + free_slots:
                raise QueueFull(f"{self.max_queue} requests are already waiting for a slot")
            self._incoming.append(request)
            self._cv.notify()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Cancel everything in flight and end the loop."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def busy_slots(self) -> int:
        return sum(1 for s in self.slots if s.request is not None)

    def queued(self) -> int:
        return len(self._incoming) + len(self._waiting)

    def kv_cells_used(self) -> int:
        return sum(len(s.cached) for s in self.slots) if self.model else 0

    # -- the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    if self._stopping:
                        break
                    if not self._has_work_locked():
                        self._wait_idle_locked()
                        continue
                    arrivals = list(self._incoming)
                    self._incoming.clear()
                    calls = list(self._calls)
                    self._calls.clear()
                self._run_calls(calls)
                self._run_embeddings()
                self._accept(arrivals)
                self._cancel_abandoned()
                self._admit()
                if any(s.request for s in self.slots):
                    self._step()
        except Exception:  # noqa: BLE001 - the loop must report, not vanish silently
            log.exception("scheduler loop failed: the child exits so that the router can start a new one")
            self._fail_everything("the engine failed")
            # A child without its decode loop serves nothing: leave, non-zero, and be replaced.
            os._exit(EXIT_ENGINE_FAILED)
        finally:
            with self._cv:
                self._stopping = True  # no request may wait on a loop that no longer runs
            self._fail_everything("the server is shutting down")
            llama.llama_batch_free(self._batch)

    def _has_work_locked(self) -> bool:
        return bool(self._incoming or self._calls or self._embeddings or self._waiting
                    or any(s.request for s in self.slots))

    def embed(self, inputs: list[list[int]]) -> concurrent.futures.Future[list[np.ndarray]]:
        """Embeddings of token lists (each checked by the caller), computed between decode steps
        together with other requests' (safe from any thread)."""
        job = EmbedJob(inputs, concurrent.futures.Future())
        with self._cv:
            if self._stopping or not self._thread.is_alive():
                raise EngineStopped("the server is shutting down")
            self._embeddings.add(job)
            self._cv.notify()
        return job.future

    def _run_embeddings(self) -> None:
        with self._cv:
            if not self._embeddings:
                return
        self._last_activity = time.monotonic()
        model = self._wake_model()
        assert self.embedding_settings is not None
        if self._embedder is None:
            try:
                self._embedder = EmbeddingContext(model, self.embedding_settings)
            except EmbeddingError as exc:
                with self._cv:
                    self._embeddings.fail_all(exc)
                return
        # One decode per turn of the loop, so generation steps go on between them; the queue is
        # touched under the lock (submitters append to it), the decode runs outside it.
        # While slots generate, an embedding decode is kept small (an input longer than that still
        # goes alone): each one delays every generating slot's next token by its length.
        generating = any(s.request is not None for s in self.slots)
        budget = EMBED_TOKENS_WHILE_GENERATING if generating else self._embedder.batch_tokens
        with self._cv:
            batch = self._embeddings.next_batch(budget)
        if not batch:
            return
        try:
            vectors = self._embedder.embed([inputs for _, inputs in batch])
        except EmbeddingError as exc:
            with self._cv:
                self._embeddings.fail(batch, exc)
            return
        self.stats.embedding_inputs_total += len(batch)
        with self._cv:
            self._embeddings.record(batch, vectors)

    def embedding_inputs_queued(self) -> int:
        with self._cv:
            return self._embeddings.pending_inputs()

    def call(self, work: Callable[[LlamaModel], T]) -> concurrent.futures.Future[T]:
        """Run `work(model)` on the scheduler thread between two steps (waking a sleeping model).

        For what needs the model but is no generation (tokenizing, say): only this thread may
        touch the model, since it is also the one that frees it when it sleeps.
        """
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cv:
            if self._stopping or not self._thread.is_alive():
                raise EngineStopped("the server is shutting down")
            self._calls.append((work, future))  # type: ignore[arg-type]
            self._cv.notify()
        return future

    def _run_calls(self, calls: list[tuple[Callable[[LlamaModel], object], concurrent.futures.Future[object]]]
                   ) -> None:
        if not calls:
            return
        self._last_activity = time.monotonic()
        model = self._wake_model()
        for work, future in calls:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(work(model))
                except Exception as exc:  # noqa: BLE001 - the caller gets the error
                    future.set_exception(exc)

    def _wait_idle_locked(self) -> None:
        """Block until a request arrives; sleep the model if none comes for sleep_idle_s."""
        if self.sleep_idle_s >= 0 and self.model is not None:
            remaining = self._last_activity + self.sleep_idle_s - time.monotonic()
            if remaining <= 0:
                self._sleep_model()
                return
            self._cv.wait(remaining)
        else:
            self._cv.wait()
        if self._incoming and self.batch_window_s > 0 and not self._stopping:
            # Requests that arrive together start together: the window stays open for its whole
            # length (each submit notifies, which must not end it early), then all that arrived
            # in it are admitted in one step.
            deadline = time.monotonic() + self.batch_window_s
            while not self._stopping and (remaining := deadline - time.monotonic()) > 0:
                self._cv.wait(remaining)

    def _sleep_model(self) -> None:
        assert self.model is not None
        log.info("idle for %.1f s: releasing the model", self.sleep_idle_s)
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        self.model.close()
        self.model = None
        for slot in self.slots:
            slot.cached = []
        self._on_sleep()

    def _wake_model(self) -> LlamaModel:
        if self.model is None:
            log.info("request arrived: loading the model again")
            self.model = self._reload_model()
            self._on_wake()
        return self.model

    def _accept(self, arrivals: list[GenerationRequest]) -> None:
        """Tokenize and validate new requests; good ones wait for a slot."""
        if not arrivals:
            return
        self._last_activity = time.monotonic()
        model = self._wake_model()
        for request in arrivals:
            if request.cancelled.is_set():
                continue
            try:
                if isinstance(request.prompt, str):
                    tokens = model.tokenize(request.prompt, add_special=request.add_special, parse_special=True)
                else:
                    tokens = list(request.prompt)
            except (UnicodeError, ValueError) as exc:  # one bad prompt fails alone, never the loop
                request.sink(Failed(f"the prompt cannot be tokenized: {exc}", 400, "invalid_request_error"))
                continue
            error = self._validate(request, tokens)
            if error:
                request.sink(Failed(error, 400, "invalid_request_error"))
                continue
            request.sink(Accepted(len(tokens)))
            self._waiting.append((request, tokens))

    def _validate(self, request: GenerationRequest, tokens: list[int]) -> str | None:
        assert self.model is not None
        if not tokens:
            return "the prompt is empty"
        if any(t < 0 or t >= self.model.n_vocab for t in tokens):
            return f"the prompt has a token id outside the vocabulary (0..{self.model.n_vocab - 1})"
        if len(tokens) >= self.n_ctx_slot:
            return (f"the prompt is {len(tokens)} tokens, but a slot's context is {self.n_ctx_slot} "
                    "tokens: shorten it or start the model with a larger -c")
        if request.max_tokens > 0 and len(tokens) + request.max_tokens > self.n_ctx_slot:
            return (f"prompt ({len(tokens)} tokens) + max_tokens ({request.max_tokens}) exceeds a slot's "
                    f"context of {self.n_ctx_slot} tokens")
        return None

    def _cancel_abandoned(self) -> None:
        for slot in self.slots:
            if slot.request is not None and slot.request.cancelled.is_set():
                log.info("request %d cancelled: slot %d freed", slot.request.id, slot.seq_id)
                self._release(slot)
        if any(r.cancelled.is_set() for r, _ in self._waiting):
            self._waiting = collections.deque((r, t) for r, t in self._waiting if not r.cancelled.is_set())

    def _admit(self) -> None:
        free = [s for s in self.slots if s.request is None]
        # In arrival order: a request with n choices waits for n free slots, and those behind it
        # wait too (it would starve otherwise).
        while self._waiting and len(free) >= self._waiting[0][0].n:
            request, tokens = self._waiting.popleft()
            # Prefer the free slot that already holds the longest prefix of this prompt (prompt
            # cache); among equals the lowest seq id.
            best = max(free, key=lambda s: (common_prefix(s.cached, tokens) if request.cache_prompt else 0,
                                            -s.seq_id))
            free.remove(best)
            followers = free[: request.n - 1]
            del free[: request.n - 1]
            try:
                self._start(best, request, tokens)
                for choice, follower in enumerate(followers, start=1):
                    self._start_follower(follower, best, choice)
            except Exception as exc:  # noqa: BLE001 - one bad request must not stop the others
                log.exception("request %d could not start", request.id)
                best.request = request
                self._finish_failed(best, f"the request could not start: {type(exc).__name__}: {exc}")

    def _start(self, slot: Slot, request: GenerationRequest, tokens: list[int]) -> None:
        assert self.model is not None
        reuse = common_prefix(slot.cached, tokens) if request.cache_prompt else 0
        reuse = min(reuse, len(tokens) - 1)  # feed at least one token to get logits
        if not llama.llama_memory_seq_rm(self.model.memory, slot.seq_id, reuse, -1):
            # Some caches (sliding window, recurrent) cannot drop a suffix: start the seq over.
            self.model.forget(slot.seq_id)
            reuse = 0
        slot.cached = tokens[:reuse]
        slot.request = request
        slot.prompt = tokens
        slot.prompt_pos = reuse
        slot.n_reused = reuse
        self._prepare_choice(slot, request, tokens, choice=0)
        self.stats.requests_total += 1

    def _start_follower(self, slot: Slot, leader: Slot, choice: int) -> None:
        """Another choice of the leader's request: no prefill of its own; it gets the leader's
        KV cells once the prompt is in."""
        assert self.model is not None and leader.request is not None
        self.model.forget(slot.seq_id)
        slot.cached = []
        slot.request = leader.request
        slot.prompt = leader.prompt
        slot.prompt_pos = len(leader.prompt)
        slot.n_reused = leader.n_reused
        slot.awaiting_leader = True
        leader.followers.append(slot)
        self._prepare_choice(slot, leader.request, leader.prompt, choice)

    def _prepare_choice(self, slot: Slot, request: GenerationRequest, tokens: list[int], choice: int) -> None:
        assert self.model is not None
        slot.choice = choice
        slot.generated = 0
        slot.next_token = -1
        params = request.sampling
        if choice and params.seed >= 0:
            params = dataclasses.replace(params, seed=params.seed + choice)  # the same seed, other choices
        slot.sampler = Sampler(params, self.model.n_vocab)
        slot.sampler.prime(tokens)
        slot.text = TextAssembler(request.stop)
        slot.constraint = request.grammar.start() if request.grammar is not None else None
        slot.logprobs = []
        slot.text_bytes = slot.logprob_bytes = 0
        slot.t_start = time.perf_counter()
        slot.t_first_token = 0.0

    def _step(self) -> None:
        """One llama_decode over every active slot."""
        assert self.model is not None
        batch = self._batch
        decoding = [s for s in self.slots if s.request is not None and not s.prefilling]
        prefilling = [s for s in self.slots if s.request is not None and s.prefilling]
        budget = self.n_batch - len(decoding)
        chunk: dict[int, int] = {}  # seq id -> prompt tokens to feed this step
        for slot in prefilling:
            if budget <= 0:
                break
            take = min(budget, len(slot.prompt) - slot.prompt_pos)
            chunk[slot.seq_id] = take
            budget -= take

        n = 0
        wants_logits: list[tuple[Slot, int]] = []
        for slot in self.slots:  # ascending seq id
            if slot.request is None or slot.awaiting_leader:
                continue
            if not slot.prefilling:
                feed = [slot.next_token]
                last_gets_logits = True
            elif slot.seq_id in chunk:
                take = chunk[slot.seq_id]
                feed = slot.prompt[slot.prompt_pos: slot.prompt_pos + take]
                last_gets_logits = slot.prompt_pos + take == len(slot.prompt)
            else:
                continue
            n = add_to_batch(batch, n, slot.seq_id, len(slot.cached), feed, last_gets_logits)
            if last_gets_logits:
                wants_logits.append((slot, n - 1))
            slot.cached.extend(feed)
            if slot.prefilling:
                slot.prompt_pos += len(feed)
        batch.n_tokens = n

        started = time.perf_counter()
        result = llama.llama_decode(self.model.ctx, batch)
        self.stats.decode_calls_total += 1
        self.stats.sequences_decoded_total += len(wants_logits)
        if result != 0:
            log.error("llama_decode returned %d for a batch of %d tokens", result, n)
            for slot in self.slots:
                if slot.request is not None:
                    self._finish_failed(slot, f"decoding failed (llama_decode returned {result})")
            return
        self.stats.prompt_tokens_total += sum(chunk.values())
        for slot, index in wants_logits:
            group = [slot]
            if slot.followers:  # the prompt is in: the other choices start from the same cells
                for follower in slot.followers:
                    llama.llama_memory_seq_cp(self.model.memory, slot.seq_id, follower.seq_id, -1, -1)
                    follower.cached = list(slot.cached)
                    follower.awaiting_leader = False
                group += slot.followers
                slot.followers = []
            self._pick_tokens(group, index)
        self.stats.decode_seconds_total += time.perf_counter() - started

    def _pick_tokens(self, group: list[Slot], index: int) -> None:
        """Each slot's next token from the logits at `index` (several slots: the first tokens of a
        request's choices, all from its prompt's logits)."""
        assert self.model is not None
        request = group[0].request
        assert request is not None
        logits = logits_at(self.model.ctx, index, self.model.n_vocab)
        basis = LogprobBasis.of(logits, request.logprobs) if request.logprobs is not None else None
        for slot in group:
            assert slot.sampler is not None
            if slot.constraint is not None:
                slot.constraint.apply(logits)  # choices of one request mask alike at their first token
                if slot.constraint.failed:  # computing the mask can fail too (llguidance's limits)
                    self._finish_failed(slot, slot.constraint.failed, 400)
                    continue
            token = slot.sampler.sample(self.model.ctx, index)
            if slot.constraint is not None:
                if not slot.constraint.allows(token):
                    # Every token the grammar allows was ruled out (logit_bias, say): the sampler
                    # had to pick a forbidden one.
                    self._finish_failed(slot, f"{slot.constraint.description} cannot be followed: the request's "
                                              "sampling settings (logit_bias) rule out every token it allows", 400)
                    continue
                slot.constraint.accept(token)
            if basis is not None:
                slot.logprobs.append(token_logprob(self.model, logits, basis, token))
            self._on_token(slot, token)

    def _on_token(self, slot: Slot, token: int) -> None:
        assert self.model is not None and slot.request is not None and slot.text is not None
        request = slot.request
        if slot.generated == 0:
            slot.t_first_token = time.perf_counter()
        slot.generated += 1
        self.stats.generated_tokens_total += 1
        if self.model.is_eog(token) and not request.ignore_eos:
            if slot.logprobs and slot.logprobs[-1].token == token:
                slot.logprobs.pop()  # the end of the text is no token of it
            self._finish(slot, "stop", slot.text.finish())
            return
        if slot.constraint is not None and slot.constraint.failed:
            self._finish_failed(slot, slot.constraint.failed, 400)
            return
        text = slot.text.push(self.model.token_piece(token))
        if slot.text.stopped_by is not None:
            self._drop_logprobs_beyond(slot, slot.text_bytes + len(text.encode()))
        if slot.text.stopped_by is not None or (slot.constraint is not None and slot.constraint.done):
            self._finish(slot, "stop", text + (slot.text.finish() if slot.text.stopped_by is None else ""))
            return
        out_of_room = len(slot.cached) + 1 >= self.n_ctx_slot
        if (request.max_tokens > 0 and slot.generated >= request.max_tokens) or out_of_room:
            self._finish(slot, "length", text + slot.text.finish())
            return
        if text:
            slot.text_bytes += len(text.encode())
            request.sink(Delta(text, slot.choice, self._take_logprobs(slot)))
        slot.next_token = token

    def _take_logprobs(self, slot: Slot) -> tuple[TokenLogprob, ...]:
        taken, slot.logprobs = tuple(slot.logprobs), []
        slot.logprob_bytes += sum(len(self._text_piece(entry.token)) for entry in taken)
        return taken

    def _drop_logprobs_beyond(self, slot: Slot, text_end: int) -> None:
        """A stop string ended the text at byte `text_end`: the tokens that begin after it (the
        stop string's own) are no part of the answer, and neither are their logprobs. Counted in
        the bytes the text is made of (special tokens write none), not the pieces logprobs show."""
        start = slot.logprob_bytes
        kept = []
        for entry in slot.logprobs:
            if start >= text_end:
                break
            kept.append(entry)
            start += len(self._text_piece(entry.token))
        slot.logprobs = kept

    def _text_piece(self, token: int) -> bytes:
        assert self.model is not None
        return self.model.token_piece(token)

    def _finish(self, slot: Slot, reason: str, last_text: str) -> None:
        request = slot.request
        assert request is not None
        now = time.perf_counter()
        if last_text or slot.logprobs:
            request.sink(Delta(last_text, slot.choice, self._take_logprobs(slot)))
        request.sink(Done(
            finish_reason=reason,
            prompt_tokens=len(slot.prompt),
            completion_tokens=slot.generated,
            cached_tokens=slot.n_reused,
            prompt_ms=(slot.t_first_token - slot.t_start) * 1000.0,
            predicted_ms=(now - slot.t_first_token) * 1000.0,
            choice=slot.choice,
            stop_word=(slot.text.stopped_by if slot.text is not None else None) or "",
            slot=slot.seq_id,
        ))
        self._release(slot)

    def _finish_failed(self, slot: Slot, message: str, status: int = 500) -> None:
        assert slot.request is not None
        slot.request.sink(Failed(message, status, "invalid_request_error" if status == 400 else "server_error"))
        slot.request.cancel()  # its other choices, if any, leave at the next step
        self._release(slot)
        if self.model is not None:
            self.model.forget(slot.seq_id)
        slot.cached = []

    def _release(self, slot: Slot) -> None:
        if slot.sampler is not None:
            slot.sampler.close()
        slot.sampler = None
        slot.request = None
        slot.text = None
        slot.prompt = []
        slot.constraint = None
        slot.logprobs = []
        slot.followers = []
        slot.awaiting_leader = False
        self._last_activity = time.monotonic()

    def _fail_everything(self, message: str) -> None:
        for slot in self.slots:
            if slot.request is not None:
                slot.request.sink(Failed(message, 503, "unavailable_error"))
                self._release(slot)
        with self._cv:
            pending = [r for r, _ in self._waiting] + list(self._incoming)
            calls, self._calls = self._calls, []
            self._embeddings.fail_all(EngineStopped(message))
            self._waiting.clear()
            self._incoming.clear()
        for _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineStopped(message))
        for request in pending:
            request.sink(Failed(message, 503, "unavailable_error"))
