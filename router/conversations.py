"""Which model serves each resumable conversation, so stream routes reach the right child.

Bounded twice, because the ids come from clients: in entries and in bytes (the ids themselves are
checked before they get here, at most 256 characters). The least recently touched entries go
first. Entries expire: one outlives its child's session only by a margin, since sessions
themselves expire after their TTL.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from types import TracebackType

from router.errors import RouterError

# A dict slot, the key and value objects and the tuple, roughly, on top of the characters.
ENTRY_OVERHEAD_BYTES = 200


class ConversationMap:
    def __init__(self, max_entries: int = 10_000, max_bytes: int = 4 * 1024 * 1024, ttl_s: float = 3600.0) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.bytes = 0
        # id -> (model, last touched, the number of the `remember` that wrote it)
        self._owners: OrderedDict[str, tuple[str, float, int]] = OrderedDict()
        self._writes = 0
        # Requests of a conversation still waiting for their model (a load, room): DELETE cancels them.
        # Bounded by the requests in flight, which the router's queues bound.
        self._waiting: dict[str, set[CancelledByDelete]] = {}

    @staticmethod
    def _cost(conversation_id: str, model: str) -> int:
        return len(conversation_id) + len(model) + ENTRY_OVERHEAD_BYTES

    def remember(self, conversation_id: str, model: str) -> int:
        """Record the owner; returns this write's number, for `restore`."""
        self._forget(conversation_id)
        self._writes += 1
        self._owners[conversation_id] = (model, time.monotonic(), self._writes)
        self.bytes += self._cost(conversation_id, model)
        while len(self._owners) > self.max_entries or self.bytes > self.max_bytes:
            oldest = next(iter(self._owners))
            self._forget(oldest)
        return self._writes

    def restore(self, conversation_id: str, owner: str | None, write: int) -> None:
        """Undo the `remember` numbered `write`, whose request was not accepted: back to `owner`
        (or unknown). Not if another request of the conversation has written since: its record
        stands (two POSTs with one id, the first failing while the second streams)."""
        entry = self._owners.get(conversation_id)
        if entry is None or entry[2] != write:
            return
        if owner is None:
            self._forget(conversation_id)
        else:
            self.remember(conversation_id, owner)

    def _forget(self, conversation_id: str) -> None:
        entry = self._owners.pop(conversation_id, None)
        if entry is not None:
            self.bytes -= self._cost(conversation_id, entry[0])

    def owner(self, conversation_id: str) -> str | None:
        entry = self._owners.get(conversation_id)
        if entry is None:
            return None
        model, touched, write = entry
        if time.monotonic() - touched > self.ttl_s:
            self._forget(conversation_id)
            return None
        self._owners[conversation_id] = (model, time.monotonic(), write)
        self._owners.move_to_end(conversation_id)
        return model

    def waiting(self, conversation_id: str) -> CancelledByDelete:
        """`async with map.waiting(id):` the block is cancelled by `cancel_waiting(id)`."""
        return CancelledByDelete(self._waiting, conversation_id)

    def cancel_waiting(self, conversation_id: str) -> bool:
        """DELETE of a conversation: its requests still waiting for their model give up."""
        waiters = self._waiting.pop(conversation_id, set())
        for waiter in waiters:
            waiter.cancel()
        return bool(waiters)

    def __len__(self) -> int:
        return len(self._owners)


class ConversationDeleted(RouterError):
    status = 409
    error_type = "invalid_request_error"


class CancelledByDelete:
    """Runs the block in the caller's task; a DELETE of the conversation cancels it, and the block
    ends with ConversationDeleted (as child/serving.cancelled_if_client_leaves does for a client
    that leaves)."""

    def __init__(self, waiting: dict[str, set[CancelledByDelete]], conversation_id: str) -> None:
        self._waiting = waiting
        self._id = conversation_id
        self._deleted = False

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._waiting.setdefault(self._id, set()).add(self)

    def cancel(self) -> None:
        self._deleted = True
        self._task.cancel()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        waiters = self._waiting.get(self._id)
        if waiters is not None:
            waiters.discard(self)
            if not waiters:
                del self._waiting[self._id]
        if exc_type is asyncio.CancelledError and self._deleted:
            self._task.uncancel()
            raise ConversationDeleted(f"conversation '{self._id}' was deleted while its request waited "
                                      "for the model") from None
