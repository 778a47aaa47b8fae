"""A resumable stream whose client left keeps generating in its child (the client may come back
for it). The router then holds a lease on the model until the child says the stream has ended, so
that the model is neither evicted to make room nor unloaded as idle under it.

The child is asked every POLL_INTERVAL_S through its /v1/streams/lookup; a child that stops
answering, or a model that stops, ends the hold, and so does the router's read timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging

from router.child_launch import CHILD_HOST
from router.model_record import ModelRecord
from router.registry import Lease, Registry
from router.upstream_client import UpstreamError

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5


def hold_while_generating(registry: Registry, record: ModelRecord, conversation_id: str) -> None:
    """Called while the abandoned relay still holds its own lease: the model never looks idle."""
    registry.background(_hold(registry, registry.hold(record), conversation_id))


async def _hold(registry: Registry, lease: Lease, conversation_id: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + registry.settings.timeout_s
    body = json.dumps({"conversation_ids": [conversation_id]}).encode()
    try:
        while loop.time() < deadline:
            await asyncio.sleep(POLL_INTERVAL_S)
            if not await _still_generating(registry, lease.record, body):
                return
        log.warning("[%s] stream %s still runs after --timeout: the model is no longer held for it",
                    lease.record.name, conversation_id)
    finally:
        lease.release()


async def _still_generating(registry: Registry, record: ModelRecord, body: bytes) -> bool:
    port = record.port
    if port is None or not record.status.can_serve:
        return False
    try:
        upstream = await registry.http.request("POST", CHILD_HOST, port, "/v1/streams/lookup",
                                               [(b"content-type", b"application/json")], body)
        try:
            data = await upstream.read()
        finally:
            upstream.release()
        found = json.loads(data)
    except (UpstreamError, ValueError):
        return False
    return isinstance(found, list) and any(isinstance(e, dict) and e.get("is_done") is False for e in found)
