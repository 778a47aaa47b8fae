"""Each model's recent log lines (its child's stdout logs and stderr), kept in a bounded ring.

The dashboard follows them through GET /models/logs?model=X: first what the ring holds, then
live lines. A ring outlives the child, so the last lines before a crash stay readable.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from router.events import EventHub

LINES_PER_MODEL = 1000
MAX_LINE_CHARS = 4000


class ModelLogs:
    def __init__(self, lines_per_model: int = LINES_PER_MODEL) -> None:
        self.lines_per_model = lines_per_model
        self._rings: dict[str, deque[dict[str, Any]]] = {}
        self.live = EventHub()

    def append(self, model: str, line: str) -> None:
        entry = {"model": model, "time": time.time(), "line": line[:MAX_LINE_CHARS]}
        ring = self._rings.get(model)
        if ring is None:
            ring = self._rings[model] = deque(maxlen=self.lines_per_model)
        ring.append(entry)
        self.live.publish(model, "log", entry)

    def recent(self, model: str) -> list[dict[str, Any]]:
        return list(self._rings.get(model, ()))
