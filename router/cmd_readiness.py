"""When a `cmd` child is ready: it says nothing on the router's protocol, so its check endpoint
is polled until it answers 200 (bounded by the model's load-timeout, which kills it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from router.child_launch import CHILD_HOST, wait_until_http_ready
from router.child_process import ChildProcess
from router.model_record import ModelRecord
from router.model_status import ModelStatus
from router.upstream import local_child

if TYPE_CHECKING:
    from router.registry import Registry


async def poll_until_ready(registry: Registry, record: ModelRecord, child: ChildProcess) -> None:
    """Loaded once its check endpoint answers 200, if it is still this record's loading child."""
    port = record.assigned_port
    assert port is not None
    url = f"http://{CHILD_HOST}:{port}{record.spec.check_endpoint}"
    ready = await wait_until_http_ready(
        registry.http, port, record.spec.check_endpoint,
        still_waiting=lambda: record.child is child and record.status == ModelStatus.LOADING)
    if not ready or record.child is not child or record.status != ModelStatus.LOADING:
        return
    record.upstream = local_child(port)
    record.meta = {"port": port, "check_endpoint": record.spec.check_endpoint}
    registry.set_status(record, ModelStatus.LOADED, f"({url} answered 200)", info=record.meta)
