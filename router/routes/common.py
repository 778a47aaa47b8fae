"""Small helpers shared by the route modules."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from fastapi import Request
from starlette.types import Scope

from child.openai_http import NotAJsonObject, json_object
from router.errors import InvalidRequest
from router.registry import Registry


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
