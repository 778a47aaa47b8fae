"""Small helpers shared by the route modules."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import Request

from router.errors import ClientGone, InvalidRequest
from router.registry import Registry

T = TypeVar("T")


def registry_of(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


async def json_body(request: Request) -> tuple[bytes, dict[str, Any]]:
    """The raw body and its JSON object, or a 400 that says what is wrong."""
    raw = await request.body()
    try:
        data = json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return raw, data


def model_field(data: dict[str, Any]) -> str | None:
    value = data.get("model")
    if value is not None and not isinstance(value, str):
        raise InvalidRequest("'model' must be a string")
    return value


def required_model_field(data: dict[str, Any], missing_message: str) -> str:
    """The body's model name, or a 400 with `missing_message` (llama.cpp's wording differs by route)."""
    name = model_field(data)
    if not name:
        raise InvalidRequest(missing_message)
    return name


def autoload_of(request: Request) -> bool:
    """?autoload=true|false overrides --models-autoload for one request, as in llama.cpp."""
    value = request.query_params.get("autoload")
    if value is None:
        return bool(request.app.state.settings.models_autoload)
    return value.lower() in ("1", "true")


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Await `work` (waiting for a model, say), cancelling it if the client disconnects meanwhile.

    Starlette does not cancel a handler whose client left, so without this a request that waited
    in the load queue would still load its model for nobody.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientGone("the client disconnected while waiting")
