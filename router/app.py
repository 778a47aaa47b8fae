"""The router's FastAPI application: lifespan, error rendering, routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp

from child.serving import ClientDisconnected, fastapi_options
from router.abandoned_streams import StreamHolds
from router.auth import ApiKeyMiddleware
from router.body_limit import BodyLimitMiddleware
from router.conversations import ConversationMap
from router.downloads import Downloads
from router.errors import RouterError, error_response, error_response_for
from router.events import EventHub
from router.fast_path import ProxiedPostsFastPath
from router.idle_reaper import reap_idle_models
from router.memory_sampler import sample_resident_memory
from router.model_sources import ModelSpec
from router.peers import Peers
from router.proxy import make_client
from router.registry import Registry
from router.remote_models import check_remote_models
from router.routes import health, models, openai, passthrough, streams
from router.settings import RouterSettings

log = logging.getLogger(__name__)


def create_app(settings: RouterSettings, specs: list[ModelSpec], router_port: int) -> FastAPI:
    events = EventHub(settings.sse_queue_size)
    http = make_client(settings)
    registry = Registry(settings, specs, events, http)
    registry.router_port = router_port

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        startup = [asyncio.create_task(_load_on_startup(registry, r.name))
                   for r in registry.records.values() if r.spec.load_on_startup]
        startup.append(asyncio.create_task(reap_idle_models(registry), name="idle-reaper"))
        startup.append(asyncio.create_task(sample_resident_memory(registry), name="memory-sampler"))
        startup.append(asyncio.create_task(check_remote_models(registry), name="remote-checks"))
        peers.start()
        try:
            yield
        finally:
            for task in startup:
                task.cancel()
            await peers.stop()
            events.close_all()
            registry.logs.live.close_all()
            await app.state.downloads.cancel_all()
            await registry.shutdown()
            await http.close()

    app = FastAPI(title="modelyard", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  **fastapi_options())
    app.state.settings = settings
    app.state.registry = registry
    app.state.http = http
    conversations = app.state.conversations = ConversationMap()
    registry.metrics.watch_conversations(lambda: len(conversations), lambda: conversations.bytes)
    registry.downloads = app.state.downloads = Downloads(registry, settings.hf_token)
    app.state.stream_holds = StreamHolds(registry)
    peers = app.state.peers = Peers(registry, settings)

    @app.exception_handler(RouterError)
    @app.exception_handler(ClientDisconnected)
    @app.exception_handler(Exception)
    async def _error(_: Request, exc: Exception) -> Response:
        return error_response_for(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else \
            "invalid_request_error" if 400 <= exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        return error_response(400, str(exc.errors()[0].get("msg", "invalid request")), "invalid_request_error")

    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(openai.router)
    app.include_router(streams.router)

    dashboard = Path(__file__).parent / "static" / "index.html"

    @app.get("/", include_in_schema=False)
    async def _dashboard() -> FileResponse:
        return FileResponse(dashboard, media_type="text/html")

    app.include_router(passthrough.router)  # last: it takes whatever the routes above do not

    return app


def front_door(app: FastAPI) -> ASGIApp:
    """What uvicorn serves: the FastAPI app behind the checks every request passes, and with the
    proxied POSTs taken before FastAPI's own layers (see router/fast_path.py).

    Outermost first: CORS answers preflights before the key check (browsers send no credentials
    on a preflight), the size limit applies before anything reads a body, then the key.
    """
    settings: RouterSettings = app.state.settings
    entry: ASGIApp = ProxiedPostsFastPath(app, openai.PROXIED_POSTS, openai.proxy_body)
    if settings.api_keys:
        entry = ApiKeyMiddleware(entry, api_keys=settings.api_keys)
    entry = BodyLimitMiddleware(entry, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        entry = CORSMiddleware(entry, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"])
    return entry


async def _load_on_startup(registry: Registry, name: str) -> None:
    try:
        await registry.load(name)
    except RouterError as exc:
        log.error("load-on-startup of %s failed: %s", name, exc.message)
