"""Routes the router does not know itself, reaching a model's child as they are.

- Any other POST goes to the model its request names: the JSON body's `model`, a multipart form's
  `model` field (`/v1/audio/transcriptions`), or `?model=`. llama-server's routes are served
  whatever their number (`/slots/0?action=save`, `POST /props`, `/lora-adapters`), and so are the
  routes of a `bin` or `cmd` child that llama-server does not have.
- Any other GET with `?model=` goes to that model (`/lora-adapters?model=X`, `/slots?model=X`).
- `/upstream/<model>/<path>` reaches a model's own routes under any method, as llama-swap's does:
  the child's web UI, say, whose pages and assets name no model.
"""

from __future__ import annotations

from urllib.parse import unquote

from fastapi import APIRouter, Request, Response

from child.openai_http import NotAJsonObject, json_object
from router.errors import InvalidRequest, NotFound
from router.proxy import target_of
from router.replica_relay import send_to_model
from router.routes.common import model_field, model_in_query, registry_of
from router.routes.openai import proxy_get, proxy_named

router = APIRouter()

# Not HEAD (its answer has no body, which the relay would wait for) nor OPTIONS (CORS preflights).
UPSTREAM_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


async def model_of_post(request: Request, body: bytes) -> str | None:
    """The model a POST names: `?model=` first, then the multipart field or the JSON body."""
    if named := model_in_query(request.scope):
        return named
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        # Starlette parses the form from the body already read; files spool to disk past 1 MiB.
        async with request.form(max_files=64, max_fields=256) as form:
            value = form.get("model")
        if value is not None and not isinstance(value, str):
            raise InvalidRequest("the form field 'model' must be text, not a file")
        return value
    try:
        return model_field(json_object(body))
    except NotAJsonObject:
        return None  # nothing names a model: the caller answers 404


@router.api_route("/upstream/{rest:path}", methods=UPSTREAM_METHODS, include_in_schema=False)
async def upstream(request: Request, rest: str) -> Response:
    """llama-swap's `/upstream/<model>/<path>`: the child's `/<path>`, query kept. A model's name
    may hold `/` (`user/repo:Q4_K_M`): the longest run of leading segments that names a model is
    the model, the rest its path."""
    body = await request.body()
    # From the path as the client sent it, still percent-encoded: a decoded one could hold a `?`.
    raw_path, _, query = target_of(request.scope).partition("?")
    segments = raw_path.split("/")[2:]  # after "", "upstream"
    registry = registry_of(request)
    for count in range(len(segments), 0, -1):
        name = unquote("/".join(segments[:count]))
        if registry.serves(name):
            break
    else:
        raise InvalidRequest(f"model '{unquote(segments[0]) if segments else ''}' not found")
    target = "/" + "/".join(segments[count:]) + ("?" + query if query else "")
    return await send_to_model(request.scope, request.receive, name, request.method, target, body, own_route=True)


@router.post("/{path:path}", include_in_schema=False)
async def any_post(request: Request, path: str) -> Response:
    body = await request.body()
    name = await model_of_post(request, body)
    if not name:
        # A path no model is named for: the router's own 404, as llama-server's router answers.
        raise NotFound(f"no route POST /{path} (a model's own routes need the model named in the JSON "
                       "body's 'model', a form field 'model' or ?model=)")
    return await proxy_named(request.scope, request.receive, body, name, streamed=False)


@router.get("/{path:path}", include_in_schema=False)
async def any_get(request: Request, path: str) -> Response:
    if not request.query_params.get("model"):
        raise NotFound(f"no route GET /{path}")
    return await proxy_get(request)
