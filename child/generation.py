"""The bridge between the scheduler thread and the event loop: one request's events.

The scheduler emits an event per token per request. Waking the event loop for each of them costs
a self-pipe write and a loop iteration, and on a 2-core machine every cycle the loop spends is
taken from libllama's threads. So events are handed over through one EventPump per loop: the
scheduler thread appends, and at most one wake-up is pending at a time, which delivers everything
emitted by then (in practice one wake-up per decode step, whatever the batch size).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import AsyncIterator

from child.engine.constraints import Grammar
from child.engine.requests import Accepted, Delta, Done, EngineEvent, Failed, GenerationRequest
from child.engine.scheduler import EngineStopped, QueueFull
from child.openai_schema import GenerationBody, RequestError
from child.runtime import ChildRuntime


class EventPump:
    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, EventPump] = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[EngineEvent], EngineEvent]] = []

    @classmethod
    def for_running_loop(cls) -> EventPump:
        loop = asyncio.get_running_loop()
        pump = cls._by_loop.get(loop)
        if pump is None:
            pump = cls._by_loop[loop] = cls(loop)
        return pump

    def push(self, queue: asyncio.Queue[EngineEvent], event: EngineEvent) -> None:
        """Called from the scheduler thread."""
        with self._lock:
            wake = not self._pending
            self._pending.append((queue, event))
        if wake:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the process is exiting
                self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


class Generation:
    """One request's trip through the engine, seen from the event loop."""

    def __init__(self, runtime: ChildRuntime, body: GenerationBody, prompt: str | list[int],
                 add_special: bool, grammar: Grammar | None = None, logprobs: int | None = None,
                 stop: list[str] | None = None) -> None:
        self.runtime = runtime
        self.events: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self._pump = EventPump.for_running_loop()
        settings = runtime.settings
        self.request = GenerationRequest(
            prompt=prompt,
            sampling=body.sampling(settings.default_sampling, runtime.n_vocab),
            max_tokens=body.requested_max_tokens(settings.default_max_tokens),
            stop=body.stop_strings() if stop is None else stop,
            sink=self._sink_from_any_thread,
            ignore_eos=body.ignore_eos,
            cache_prompt=body.cache_prompt,
            add_special=add_special,
            grammar=grammar,
            logprobs=logprobs,
            n=body.n,
        )

    def _sink_from_any_thread(self, event: EngineEvent) -> None:
        self._pump.push(self.events, event)

    async def start(self) -> Accepted:
        """Submit and wait until the engine accepted the prompt (or raise RequestError)."""
        assert self.runtime.scheduler is not None
        try:
            self.runtime.scheduler.submit(self.request)
        except QueueFull as exc:
            raise RequestError(f"server busy: {exc}", 503, "unavailable_error") from exc
        except EngineStopped as exc:
            raise RequestError(str(exc), 503, "unavailable_error") from exc
        try:
            first = await self.events.get()
        except asyncio.CancelledError:
            self.request.cancel()
            raise
        if isinstance(first, Failed):
            raise RequestError(first.message, first.status, first.error_type)
        assert isinstance(first, Accepted)
        return first

    async def events_until_done(self) -> AsyncIterator[Delta | Done | Failed]:
        """Events until every choice is done (or one failed). Deltas of one choice that arrived
        together are merged into one."""
        remaining = self.request.n
        held: EngineEvent | None = None  # taken from the queue while merging, not yet given out
        try:
            while remaining:
                event, held = (held, None) if held is not None else (await self.events.get(), None)
                assert not isinstance(event, Accepted)
                if isinstance(event, Delta):
                    while not self.events.empty():
                        following = self.events.get_nowait()
                        if not isinstance(following, Delta) or following.choice != event.choice:
                            held = following
                            break
                        event = Delta(event.text + following.text, event.choice, event.logprobs + following.logprobs)
                yield event
                if isinstance(event, Failed):
                    return
                if isinstance(event, Done):
                    remaining -= 1
        finally:
            # Normal end, client gone or server stopping: the slots are freed within one step.
            self.request.cancel()
