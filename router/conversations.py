"""Which model serves each resumable conversation, so stream routes reach the right child.

Bounded (least recently touched entries go first) and expiring: an entry outlives its child's
session only by a margin, since sessions themselves expire after their TTL.
"""

from __future__ import annotations

import time
from collections import OrderedDict


class ConversationMap:
    def __init__(self, max_entries: int = 10_000, ttl_s: float = 3600.0) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._owners: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def remember(self, conversation_id: str, model: str) -> None:
        self._owners[conversation_id] = (model, time.monotonic())
        self._owners.move_to_end(conversation_id)
        while len(self._owners) > self.max_entries:
            self._owners.popitem(last=False)

    def owner(self, conversation_id: str) -> str | None:
        entry = self._owners.get(conversation_id)
        if entry is None:
            return None
        model, touched = entry
        if time.monotonic() - touched > self.ttl_s:
            del self._owners[conversation_id]
            return None
        self._owners[conversation_id] = (model, time.monotonic())
        self._owners.move_to_end(conversation_id)
        return model
