"""The /models/sse status feed: a fan-out of model events to subscribers.

Each subscriber has a bounded queue; one that falls behind is dropped (its stream ends) rather
than ever blocking the router or growing without bound.

A loading model's `status_change` events carry its progress as llama.cpp's router sends it,
the child's `loading` payload: `{"stages": ["text_model", ...], "current": stage, "value": 0.0..1.0}`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_STAGE = "text_model"


def load_progress(payload: dict[str, Any]) -> dict[str, Any] | None:
    """A child's `loading` payload as the feed's `progress` object; None without a numeric value."""
    value = payload.get("value")
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    stages = payload.get("stages")
    if not isinstance(stages, list) or not all(isinstance(stage, str) for stage in stages) or not stages:
        stages = [DEFAULT_STAGE]
    current = payload.get("current")
    return {"stages": list(stages), "current": current if isinstance(current, str) else stages[0],
            "value": min(max(float(value), 0.0), 1.0)}


class Subscription:
    def __init__(self, hub: EventHub, queue_size: int) -> None:
        self._hub = hub
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(queue_size)

    def close(self) -> None:
        self._hub.unsubscribe(self)

    async def next(self) -> dict[str, Any] | None:
        """The next event, or None once this subscriber was dropped."""
        return await self.queue.get()


class EventHub:
    def __init__(self, queue_size: int = 1024) -> None:
        self._queue_size = queue_size
        self._subscribers: set[Subscription] = set()

    def subscribe(self) -> Subscription:
        subscription = Subscription(self, self._queue_size)
        self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    def publish(self, model: str, event: str, data: dict[str, Any] | None = None) -> None:
        message = {"model": model, "event": event, "data": data or {}}
        for subscription in list(self._subscribers):
            try:
                subscription.queue.put_nowait(message)
            except asyncio.QueueFull:
                log.warning("status feed subscriber fell behind; dropping it")
                self._subscribers.discard(subscription)
                self._drop(subscription)

    @staticmethod
    def _drop(subscription: Subscription) -> None:
        # Make room for the end marker so the subscriber's stream finishes promptly.
        while not subscription.queue.empty():
            subscription.queue.get_nowait()
        subscription.queue.put_nowait(None)

    def close_all(self) -> None:
        for subscription in list(self._subscribers):
            self._drop(subscription)
        self._subscribers.clear()
