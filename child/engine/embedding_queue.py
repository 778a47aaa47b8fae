"""Embedding requests waiting for the scheduler thread, served one llama_decode at a time.

Requests are packed together, round-robin (inputs of several requests share one decode); between
two such decodes the generation slots take their step, so a request with a thousand inputs slows
generation down but never stops it (while slots generate, a decode takes fewer tokens: see
Scheduler._run_embeddings). A request whose client has left (its future cancelled) is dropped
before its next input is computed.
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

    def pending_inputs(self) -> int:
        """Inputs still to compute for clients that are still there."""
        return sum(len(job.inputs) - len(job.vectors) for job in self._jobs if not job.future.cancelled())

    def fail_all(self, error: Exception) -> None:
        """Every waiting request ends with `error` (no embedding context, or the engine stops)."""
        jobs, self._jobs = self._jobs, collections.deque()
        for job in jobs:
            _end_with(job, error)

    def next_batch(self, budget: int) -> list[tuple[EmbedJob, list[int]]]:
        """The next inputs for one decode: at most MAX_SEQUENCES of them and `budget` tokens in
        all, or the first one alone if it is longer (the caller checked that every input fits the
        embedding context). Taken round-robin across requests, oldest first, so a one-input
        request is answered by the next decode even behind one with thousands of inputs."""
        self._pop_finished()
        batch: list[tuple[EmbedJob, list[int]]] = []
        tokens = 0
        taken = {id(job): len(job.vectors) for job in self._jobs}  # next input index per job
        added = True
        while added and len(batch) < MAX_SEQUENCES:
            added = False
            for job in self._jobs:
                position = taken[id(job)]
                if job.future.cancelled() or position == len(job.inputs):
                    continue
                inputs = job.inputs[position]
                if batch and (len(batch) == MAX_SEQUENCES or tokens + len(inputs) > budget):
                    continue
                batch.append((job, inputs))
                taken[id(job)] = position + 1
                tokens += len(inputs)
                added = True
        return batch

    def record(self, batch: list[tuple[EmbedJob, list[int]]], vectors: list[np.ndarray]) -> None:
        """The vectors of next_batch()'s inputs; answers the jobs now complete."""
        for (job, _), vector in zip(batch, vectors, strict=True):
            job.vectors.append(vector)
        self._pop_finished()

    def fail(self, batch: list[tuple[EmbedJob, list[int]]], error: Exception) -> None:
        """The requests of a decode that failed end with `error`."""
        for job in {id(job): job for job, _ in batch}.values():
            self._jobs.remove(job)
            _end_with(job, error)

    def _pop_finished(self) -> None:
        """Answer every job whose vectors are all there (a small one packed beside a large one
        finishes first) and drop those whose client left."""
        finished = [job for job in self._jobs if job.future.cancelled() or len(job.vectors) == len(job.inputs)]
        for job in finished:
            self._jobs.remove(job)
            if job.future.set_running_or_notify_cancel():
                job.future.set_result(job.vectors)


def _end_with(job: EmbedJob, error: Exception) -> None:
    if job.future.set_running_or_notify_cancel():  # False: its client left, nobody waits
        job.future.set_exception(error)
