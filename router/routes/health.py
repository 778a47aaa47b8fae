"""/health and /props."""

from __future__ import annotations

from importlib import metadata
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from router.routes.openai import proxy_get

router = APIRouter()


def _build_info() -> str:
    """What the children report as their build (child/engine/llama_model.py), without loading libllama."""
    try:
        return f"llama-cpp-python {metadata.version('llama_cpp_python')}"
    except metadata.PackageNotFoundError:
        return "unknown"


BUILD_INFO = _build_info()


@router.get("/health")
@router.get("/v1/health")
async def health() -> dict[str, str]:
    """The router's own health; never needs a key, never reaches a child (whatever the query says)."""
    return {"status": "ok"}


@router.get("/metrics", response_model=None)
async def metrics(request: Request) -> Response:
    """The router's metrics and every running child's; `?model=X` asks only that child."""
    if request.query_params.get("model"):
        return await proxy_get(request)
    registry = request.app.state.registry
    body = await registry.metrics.render(list(registry.records.values()), request.app.state.http)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/props", response_model=None)
async def props(request: Request) -> dict[str, Any] | Response:
    if request.query_params.get("model"):
        return await proxy_get(request)
    settings = request.app.state.settings
    # llama.cpp's router /props, key for key; the model fields are placeholders there as well.
    return {
        "role": "router",
        "max_instances": settings.models_max,
        "models_autoload": settings.models_autoload,
        "model_alias": "modelyard",
        "model_path": "none",
        "default_generation_settings": {"params": None, "n_ctx": 0},
        "ui_settings": {},  # llama.cpp's --ui-config; modelyard's dashboard has no settings to give
        "build_info": BUILD_INFO,
        "cors_proxy_enabled": False,  # llama.cpp's MCP CORS proxy (--ui-mcp-proxy); modelyard has none
    }
