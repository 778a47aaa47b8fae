"""Which model serves each resumable conversation, so stream routes reach the right child.

Bounded twice, because the ids come from clients: in entries and in bytes (the ids themselves are
checked before they get here, at most 256 characters). The least recently touched entries go
first. Entries expire: one outlives its child's session only by a margin, since sessions
themselves expire after their TTL.
"""

from __future__ import annotations

import time
from collections import OrderedDict

# A dict slot, the key and value objects and the tuple, roughly, on top of the characters.
ENTRY_OVERHEAD_BYTES = 200


class ConversationMap:
    def __init__(self, max_entries: int = 10_000, max_bytes: int = 4 * 1024 * 1024, ttl_s: float = 3600.0) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.bytes = 0
        self._owners: OrderedDict[str, tuple[str, float]] = OrderedDict()

    @staticmethod
    def _cost(conversation_id: str, model: str) -> int:
        return len(conversation_id) + len(model) + ENTRY_OVERHEAD_BYTES

    def remember(self, conversation_id: str, model: str) -> None:
        self._forget(conversation_id)
        self._owners[conversation_id] = (model, time.monotonic())
        self.bytes += self._cost(conversation_id, model)
        while len(self._owners) > self.max_entries or self.bytes > self.max_bytes:
            oldest = next(iter(self._owners))
            self._forget(oldest)

    def _forget(self, conversation_id: str) -> None:
        entry = self._owners.pop(conversation_id, None)
        if entry is not None:
            self.bytes -= self._cost(conversation_id, entry[0])

    def owner(self, conversation_id: str) -> str | None:
        entry = self._owners.get(conversation_id)
        if entry is None:
            return None
        model, touched = entry
        if time.monotonic() - touched > self.ttl_s:
            self._forget(conversation_id)
            return None
        self._owners[conversation_id] = (model, time.monotonic())
        self._owners.move_to_end(conversation_id)
        return model

    def __len__(self) -> int:
        return len(self._owners)
