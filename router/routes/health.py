"""/health and /props."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from router.routes.openai import proxy_get

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/props", response_model=None)
async def props(request: Request) -> dict[str, Any] | Response:
    if request.query_params.get("model"):
        return await proxy_get(request)
    settings = request.app.state.settings
    return {
        "role": "router",
        "max_instances": settings.models_max,
        "models_autoload": settings.models_autoload,
        "model_alias": "modelyard",
        "model_path": "none",
        "default_generation_settings": {"params": {}, "n_ctx": 0},
    }
