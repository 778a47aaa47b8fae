"""Small helpers shared by the route modules."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any
from urllib.parse import parse_qs

from fastapi import Request
from starlette.types import Receive, Scope

from child.openai_http import NotAJsonObject, json_object
from child.serving import cancelled_if_client_leaves
from router.errors import InvalidRequest
from router.model_record import ModelRecord
from router.registry import Lease, Registry
from router.upstream import via_of


def registry_of(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


async def json_body(request: Request) -> tuple[bytes, dict[str, Any]]:
    """The raw body and its JSON object, or a 400 that says what is wrong."""
    raw = await request.body()
    try:
        return raw, json_object(raw)
    except NotAJsonObject as exc:
        raise InvalidRequest(str(exc)) from exc


def model_field(data: dict[str, Any]) -> str | None:
    value = data.get("model")
    if value is not None and not isinstance(value, str):
        raise InvalidRequest("'model' must be a string")
    return value


def model_in_query(scope: Scope) -> str | None:
    """`?model=`, which names the model of a request whose body does not."""
    query = scope["query_string"]
    return parse_qs(query.decode("latin-1")).get("model", [None])[-1] if b"model" in query else None


def required_model_field(data: dict[str, Any], missing_message: str) -> str:
    """The body's model name, or a 400 with `missing_message` (llama.cpp's wording differs by route)."""
    name = model_field(data)
    if not name:
        raise InvalidRequest(missing_message)
    return name


def autoload_of(scope: Scope) -> bool:
    """?autoload=true|false overrides --models-autoload for one request, as in llama.cpp."""
    query = scope["query_string"]
    value = parse_qs(query.decode("latin-1")).get("autoload", [None])[-1] if b"autoload" in query else None
    if value is None:
        return bool(scope["app"].state.settings.models_autoload)
    return value.lower() in ("1", "true")


async def lease_for(scope: Scope, receive: Receive, name: str | None, autoload: bool | None = None,
                    outlives_client: bool = False, exclude: Collection[ModelRecord] = (),
                    prefer: ModelRecord | None = None,
                    on_chosen: Callable[[ModelRecord], None] | None = None) -> Lease:
    """A lease on a replica of the model (`autoload` None: as the request's ?autoload= or the
    router's flag says; `exclude`, `prefer`: see Registry.choose; `on_chosen` learns the replica
    before the request waits for it). A request that has to wait, for a load say, is cancelled if
    its client leaves (a client that gives up while waiting for room costs nothing), unless it
    `outlives_client` (a resumable stream, which its client may come back for)."""
    registry: Registry = scope["app"].state.registry
    if autoload is None:
        autoload = autoload_of(scope)
    via = via_of(scope["headers"])
    if on_chosen is not None:
        prefer = registry.choose(name, exclude, prefer, via)
        on_chosen(prefer)
    lease = registry.acquire_now(name, autoload, exclude, prefer, via)
    if lease is not None:  # the model serves and is open: no wait, nothing to watch
        return lease
    if outlives_client:
        return await registry.acquire(name, autoload, exclude, prefer, via)
    async with cancelled_if_client_leaves(scope, receive):
        return await registry.acquire(name, autoload, exclude, prefer, via)
