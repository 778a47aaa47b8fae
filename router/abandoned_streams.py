"""A resumable stream whose client left keeps generating in its child (the client may come back
for it). The router then holds a lease on the model until the child says the conversation's
stream has ended, so that the model is neither evicted to make room nor unloaded as idle under it.

One hold per model and conversation, however many of its requests were abandoned (a new POST with
the same id replaces the stream in the child). The hold is outside the model's concurrency-limit:
it is work already admitted. The child is asked every POLL_INTERVAL_S through its
/v1/streams/lookup; a child that stops answering, a model that stops, or the router's read
timeout end the hold.
"""

from __future__ import annotations

import asyncio
import json
import logging

from router.model_record import ModelRecord
from router.registry import Lease, Registry
from router.upstream_client import UpstreamError

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5
POLL_TIMEOUT_S = 5.0


class StreamHolds:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._held: set[tuple[ModelRecord, str]] = set()

    def hold(self, record: ModelRecord, conversation_id: str) -> None:
        """Called while the abandoned relay still holds its own lease: the model never looks idle."""
        key = (record, conversation_id)
        if key in self._held or not record.is_local:
            return  # a remote server or a peer is never evicted from here: nothing to hold
        lease = self.registry.hold(record)
        self._held.add(key)
        log.info("[%s] stream %s goes on for a client that left: the model is held until it ends",
                 record.name, conversation_id)
        try:
            self.registry.background(self._hold(lease, conversation_id))
        except BaseException:
            self._held.discard(key)
            lease.release()
            raise

    async def _hold(self, lease: Lease, conversation_id: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.registry.settings.timeout_s
        body = json.dumps({"conversation_ids": [conversation_id]}).encode()
        try:
            while (remaining := deadline - loop.time()) > 0:
                await asyncio.sleep(min(POLL_INTERVAL_S, remaining))
                if not await self._still_generating(lease.record, body):
                    return  # ended, or a child that does not answer a lookup in time
            log.warning("[%s] stream %s still runs after --timeout: the model is no longer held for it",
                        lease.record.name, conversation_id)
        finally:
            self._held.discard((lease.record, conversation_id))
            lease.release()

    async def _still_generating(self, record: ModelRecord, body: bytes) -> bool:
        to = record.upstream
        if to is None or not record.status.can_serve:
            return False
        try:
            _, data = await self.registry.http.fetch("POST", to.host, to.port, "/v1/streams/lookup", POLL_TIMEOUT_S,
                                                     [(b"content-type", b"application/json")], body)
            found = json.loads(data)
        except (UpstreamError, TimeoutError, ValueError):
            return False
        return isinstance(found, list) and any(isinstance(e, dict) and e.get("is_done") is False for e in found)
