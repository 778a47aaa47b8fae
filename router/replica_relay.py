"""One request to one of a model's replicas, and to another when the first cannot be reached.

Registry.choose picks the replica (the conversation's, else the fewest requests in flight). A
request whose connection could not even be made was never sent: it goes to the next replica,
and the unreachable one is left out until its health check or its peer's feed says it is back.
A request that was sent is never sent twice (it may have started generating): a failure after
that is the client's 502, or the SSE error event of a stream already running.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from urllib.parse import quote

from fastapi import Response
from starlette.types import Receive, Scope

from router.errors import InvalidRequest, UpstreamUnreachable
from router.model_record import ModelRecord
from router.model_sources import SOURCE_PEER, SOURCE_REMOTE
from router.proxy import relay
from router.routes.common import lease_for
from router.upstream import body_for, query_for, remote_may_serve

log = logging.getLogger(__name__)


def target_for(record: ModelRecord, target: str, requested: str | None, own_route: bool, multipart: bool) -> str:
    """Where the request goes on the record's upstream. `own_route`: llama-swap's
    `/upstream/<model>/<path>`, the model's own route `<path>` (on a peer, its own /upstream)."""
    upstream = record.upstream
    if upstream is None:
        return target
    if record.spec.source == SOURCE_PEER and own_route:
        return f"/upstream/{quote(record.spec.peer_model, safe='')}{target}"
    if multipart and upstream.model_name is not None and requested != upstream.model_name:
        # A form's `model` field is not rewritten: the upstream would not know the name sent.
        raise InvalidRequest(f"a multipart request is sent as it is, and its field 'model' says '{requested}', "
                             f"which the server of '{record.name}' knows as '{upstream.model_name}'")
    if record.spec.source == SOURCE_REMOTE and (own_route or not remote_may_serve(target.partition("?")[0])):
        raise InvalidRequest(f"model '{record.name}' is a remote server's: only its inference routes are reached "
                             "through this router")
    return query_for(upstream, target, requested)


async def send_to_model(scope: Scope, receive: Receive, name: str | None, method: str, target: str, body: bytes,
                        *, own_route: bool = False, prefer: ModelRecord | None = None,
                        on_chosen: Callable[[ModelRecord], None] | None = None,
                        on_abandoned: Callable[[ModelRecord], None] | None = None) -> Response:
    """Relay the request to a replica of `name`. `prefer`: the replica to use if it can take it.
    `on_chosen` learns each replica tried, before the request waits for it. `on_abandoned`: the
    request is a resumable stream, which outlives its client (see routes/openai.py)."""
    state = scope["app"].state
    registry = state.registry
    multipart = any(k == b"content-type" and v.startswith(b"multipart/") for k, v in scope["headers"])
    tried: list[ModelRecord] = []
    while True:
        lease = await lease_for(scope, receive, name, exclude=tried, prefer=prefer,
                                outlives_client=on_abandoned is not None, on_chosen=on_chosen)
        record = lease.record
        try:
            sent_body = body_for(record.upstream, body, name) if record.upstream is not None else body
            sent_target = target_for(record, target, name, own_route, multipart)
        except BaseException:
            lease.release()
            raise
        try:
            if on_abandoned is not None:
                return await relay(state.http, lease, method, sent_target, scope["headers"], sent_body,
                                   on_abandoned=functools.partial(on_abandoned, record))
            return await relay(state.http, lease, method, sent_target, scope["headers"], sent_body,
                               (scope, receive))
        except UpstreamUnreachable as exc:
            registry.report_unreachable(record, exc.message)
            tried.append(record)
            if len(tried) >= len(registry.replicas(name)):
                raise
            log.warning("%s: trying another replica of %s", exc.message, name)
