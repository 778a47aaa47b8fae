"""The proxied routes: OpenAI-style POSTs routed by the body's `model`, GETs by `?model=`."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from router.errors import InvalidRequest
from router.proxy import relay
from router.routes import schemas
from router.routes.common import autoload_of, json_body, model_field, registry_of, unless_client_leaves

router = APIRouter()

PROXIED_POSTS = (
    "/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions",
    "/v1/embeddings", "/embeddings", "/v1/responses", "/infill", "/tokenize", "/detokenize",
    "/apply-template", "/v1/rerank", "/rerank",
)


CONVERSATION_HEADER = "x-conversation-id"


async def proxy_post(request: Request) -> Response:
    raw, data = await json_body(request)
    lease = await unless_client_leaves(
        request, registry_of(request).acquire(model_field(data), autoload_of(request)))
    conversation_id = request.headers.get(CONVERSATION_HEADER)
    if conversation_id and data.get("stream") is True:
        # Later GET/DELETE /v1/stream calls for this conversation go to the same child.
        request.app.state.conversations.remember(conversation_id.strip(), lease.record.name)
    return await relay(request.app.state.http, lease, "POST", request.url.path, request.url.query,
                       request.headers.items(), raw)


_BODY_SCHEMAS = {"/v1/chat/completions": schemas.CHAT, "/v1/completions": schemas.COMPLETION}

for _path in PROXIED_POSTS:
    router.add_api_route(_path, proxy_post, methods=["POST"], include_in_schema=_path.startswith("/v1/"),
                         openapi_extra=_BODY_SCHEMAS.get(_path, schemas.MODEL_ONLY))


async def proxy_get(request: Request) -> Response:
    """GET /anything?model=X reaches that model's child."""
    name = request.query_params.get("model")
    if not name:
        raise InvalidRequest("model name is missing from the request")
    lease = await unless_client_leaves(request, registry_of(request).acquire(name, autoload_of(request)))
    return await relay(request.app.state.http, lease, "GET", request.url.path, request.url.query,
                       request.headers.items(), b"")
