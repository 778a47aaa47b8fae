"""Embedding requests waiting for the scheduler thread, served one llama_decode at a time.

Requests are taken in arrival order and packed together (inputs of several requests share one
decode); between two such decodes the generation slots take their step, so a request with a
thousand inputs slows generation down but never stops it. A request whose client has left (its
future cancelled) is dropped before its next input is computed.
"""

from __future__ import annotations

import collections
import concurrent.futures
from dataclasses import dataclass, field

import numpy as np

from child.engine.embeddings import MAX_SEQUENCES


@dataclass
class EmbedJob:
    inputs: list[list[int]]
    future: concurrent.futures.Future[list[np.ndarray]]
    vectors: list[np.ndarray] = field(default_factory=list)  # of inputs[:len(vectors)]


class EmbeddingQueue:
    """Not thread-safe: every call is made under the scheduler's lock (the decode itself is not)."""

    def __init__(self) -> None:
        self._jobs: collections.deque[EmbedJob] = collections.deque()

    def __bool__(self) -> bool:
        return bool(self._jobs)

    def add(self, job: EmbedJob) -> None:
        self._jobs.append(job)

    def take_all(self) -> list[EmbedJob]:
        jobs = list(self._jobs)
        self._jobs.clear()
        return jobs

    def next_batch(self, batch_tokens: int) -> list[tuple[EmbedJob, list[int]]]:
        """The next inputs, in arrival order, that fit one decode: at most MAX_SEQUENCES of them
        and batch_tokens tokens in all (each input alone fits; the caller checked)."""
        self._pop_finished()
        batch: list[tuple[EmbedJob, list[int]]] = []
        tokens = 0
        for job in self._jobs:
            if job.future.cancelled():
                continue
            for inputs in job.inputs[len(job.vectors):]:
                if len(batch) == MAX_SEQUENCES or tokens + len(inputs) > batch_tokens:
                    break
                batch.append((job, inputs))
                tokens += len(inputs)
        return batch

    def record(self, batch: list[tuple[EmbedJob, list[int]]], vectors: list[np.ndarray]) -> None:
        """The vectors of next_batch()'s inputs; answers the jobs now complete."""
        for (job, _), vector in zip(batch, vectors, strict=True):
            job.vectors.append(vector)
        self._pop_finished()

    def fail(self, batch: list[tuple[EmbedJob, list[int]]], error: Exception) -> None:
        for job in {id(job): job for job, _ in batch}.values():
            self._jobs.remove(job)
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)

    def _pop_finished(self) -> None:
        """Inputs are computed in arrival order, so finished jobs are at the front."""
        while self._jobs:
            head = self._jobs[0]
            if not head.future.cancelled() and len(head.vectors) < len(head.inputs):
                return
            self._jobs.popleft()
            if head.future.set_running_or_notify_cancel():
                head.future.set_result(head.vectors)
