"""The proxied routes: OpenAI-style POSTs routed by the body's `model`, GETs by `?model=`."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.types import Receive, Scope

from child.openai_http import NotAJsonObject, json_object
from child.protocol import CONVERSATION_HEADER, conversation_id_problem
from router.errors import InvalidRequest
from router.model_record import ModelRecord
from router.proxy import target_of
from router.replica_relay import send_to_model
from router.routes import schemas
from router.routes.common import model_field, model_in_query

router = APIRouter()
CONVERSATION_HEADER_BYTES = CONVERSATION_HEADER.encode()

# llama-server's POST routes that name their model in a JSON body (its router proxies the same).
PROXIED_POSTS = (
    "/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions", "/completion",
    "/v1/chat/completions/input_tokens", "/chat/completions/input_tokens",
    "/v1/messages", "/v1/messages/count_tokens", "/v1/responses", "/responses", "/v1/responses/input_tokens",
    "/v1/embeddings", "/embeddings", "/embedding", "/infill", "/tokenize", "/detokenize",
    "/apply-template", "/v1/rerank", "/rerank", "/v1/reranking", "/reranking",
)


def conversation_of(scope: Scope) -> str | None:
    """The request's X-Conversation-Id, checked before anything is remembered about it."""
    raw = next((v for k, v in scope["headers"] if k == CONVERSATION_HEADER_BYTES), None)
    if raw is None:
        return None
    value = raw.decode("latin-1").strip()
    problem = conversation_id_problem(value)
    if problem:
        raise InvalidRequest(problem)
    return value


async def proxy_body(scope: Scope, receive: Receive, body: bytes) -> Response:
    """A POST routed by its body's `model` (the body already read): relayed to that model's child.

    Served by router/fast_path.py in front of FastAPI; `proxy_post` is the same for FastAPI."""
    try:
        data = json_object(body)
    except NotAJsonObject as exc:
        raise InvalidRequest(str(exc)) from exc
    return await proxy_named(scope, receive, body, model_field(data) or model_in_query(scope),
                             streamed=data.get("stream") is True)


# The routes whose streams the child keeps as resumable sessions when X-Conversation-Id is given.
RESUMABLE_POSTS = frozenset({"/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions",
                             "/completion"})


async def proxy_named(scope: Scope, receive: Receive, body: bytes, name: str | None, streamed: bool) -> Response:
    """A POST for the model `name`, with llama.cpp's X-Conversation-Id semantics: the conversation
    is recorded before the request waits for its model (GET/DELETE /v1/stream reach that model
    from then on) and kept if the child accepts the request; a DELETE of the conversation cancels
    the request while it waits; and a resumable stream does not give up when its client leaves:
    it waits for its model all the same, and the model is held until the child's stream ends.
    The conversation sticks to the replica that owns it."""
    state = scope["app"].state
    target = target_of(scope)
    conversation_id = conversation_of(scope)
    if conversation_id is None:
        return await send_to_model(scope, receive, name, "POST", target, body)
    conversations = state.conversations
    before = conversations.owner(conversation_id)
    owner = state.registry.lookup(before) if before is not None else None
    write = 0

    def record_owner(record: ModelRecord) -> None:
        nonlocal write
        write = conversations.remember(conversation_id, record.name)

    resumable = streamed and scope["path"] in RESUMABLE_POSTS
    accepted = False
    try:
        async with conversations.waiting(conversation_id):
            response = await send_to_model(
                scope, receive, name, "POST", target, body, prefer=owner, on_chosen=record_owner,
                on_abandoned=(lambda record: state.stream_holds.hold(record, conversation_id)) if resumable else None)
        accepted = 200 <= response.status_code < 300
        return response
    finally:
        if not accepted and write:  # refused, failed or cancelled: what the conversation was before stays
            conversations.restore(conversation_id, before, write)


async def proxy_post(request: Request) -> Response:
    return await proxy_body(request.scope, request.receive, await request.body())


_BODY_SCHEMAS = {"/v1/chat/completions": schemas.CHAT, "/v1/completions": schemas.COMPLETION}

for _path in PROXIED_POSTS:
    router.add_api_route(_path, proxy_post, methods=["POST"], include_in_schema=_path.startswith("/v1/"),
                         openapi_extra=_BODY_SCHEMAS.get(_path, schemas.MODEL_ONLY))


async def proxy_get(request: Request) -> Response:
    """GET /anything?model=X reaches that model's child."""
    name = request.query_params.get("model")
    if not name:
        raise InvalidRequest("model name is missing from the request")
    return await send_to_model(request.scope, request.receive, name, "GET", target_of(request.scope), b"")
