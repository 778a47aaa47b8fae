"""Relaying a request to a child and its answer back, chunk by chunk.

One shared UpstreamClient (router/upstream_client.py says why not httpx or aiohttp). An SSE
answer is relayed as its bytes arrive; if the child dies in the middle, the client gets a final SSE
error event and the end of the stream, never a hang. Other answers are small JSON bodies: they are
read whole, so a child that dies mid-answer becomes a clean 502 instead of a truncated body. The
model's lease is held until the relay ends.

A client that disconnects before its answer has started (a non-streamed completion runs for as
long as the generation) cancels the relay: the connection to the child is closed, which stops the
generation there too. Once a stream is relayed, Starlette's StreamingResponse watches for that.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope

from child.openai_http import error_bytes
from child.serving import cancelled_if_client_leaves
from router.errors import UpstreamFailed, UpstreamUnreachable
from router.registry import Lease
from router.settings import RouterSettings
from router.upstream import VIA_HEADER, via_for
from router.upstream_client import ConnectFailed, UpstreamClient, UpstreamError

log = logging.getLogger(__name__)

# Not forwarded to the child: hop-by-hop headers (and any the client's Connection header names),
# what the client sets itself, `expect` (the router already answered it; forwarded, the child's
# `100 Continue` would come back), and credentials (children never see the router's API key).
_DROP_REQUEST_HEADERS = {b"host", b"content-length", b"connection", b"keep-alive", b"transfer-encoding",
                         b"te", b"trailer", b"upgrade", b"proxy-connection", b"expect", b"authorization",
                         b"x-api-key", b"accept-encoding", b"proxy-authorization", VIA_HEADER}
_DROP_RESPONSE_HEADERS = {b"content-length", b"connection", b"keep-alive", b"transfer-encoding", b"date",
                          b"server"}

# The largest non-streamed answer taken from a remote server or a peer (it is held whole).
MAX_FOREIGN_ANSWER_BYTES = 256 * 1024 * 1024  # a full embeddings batch is some 90 MB


def make_client(settings: RouterSettings) -> UpstreamClient:
    """The router's one HTTP client towards its children."""
    return UpstreamClient(connect_timeout_s=settings.child_connect_timeout_s, read_timeout_s=settings.timeout_s)


def _sse_error(message: str) -> bytes:
    return b"data: " + error_bytes(502, message) + b"\n\n"


def target_of(scope: Scope) -> str:
    """The request's path and query as the client sent them (still percent-encoded)."""
    target = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string")
    return (target + b"?" + query if query else target).decode("latin-1")


async def relay(client: UpstreamClient, lease: Lease, method: str, target: str,
                headers: list[tuple[bytes, bytes]], body: bytes,
                watch: tuple[Scope, Receive] | None = None,
                on_abandoned: Callable[[], None] | None = None, whole: bool = False) -> Response:
    """Send the request to the lease's child and return the response to give the client.

    `target` is the encoded path and query (`target_of`), `headers` the client's raw ASGI headers.
    `watch` is the client's ASGI scope and receive channel (its body already read): when given, a
    client that leaves before the answer has started cancels the upstream request.
    `on_abandoned` is called when the client leaves a relayed stream before its end (while the
    lease is still held). `whole`: the answer is read whole even if it is a stream (for the
    router's own use of it)."""
    if watch is None:
        return await _relay(client, lease, method, target, headers, body, on_abandoned, whole)
    async with cancelled_if_client_leaves(*watch):
        return await _relay(client, lease, method, target, headers, body, on_abandoned, whole)


async def _relay(client: UpstreamClient, lease: Lease, method: str, target: str,
                 headers: list[tuple[bytes, bytes]], body: bytes,
                 on_abandoned: Callable[[], None] | None, whole: bool) -> Response:
    record = lease.record
    name = record.name
    metrics = lease.registry.metrics
    to = record.upstream
    if to is None:
        lease.release()
        raise UpstreamFailed(f"model '{name}' is not running")
    forward = [(k, v) for k, v in headers if k not in _DROP_REQUEST_HEADERS]
    if any(k == b"connection" for k, _ in headers):
        named = {token.strip().lower() for k, v in headers if k == b"connection" for token in v.split(b",")}
        forward = [(k, v) for k, v in forward if k not in named]
    forward.extend(to.headers)  # a remote server's or a peer's key
    if to.another_router:
        forward.append((VIA_HEADER, via_for(headers)))
    try:
        upstream = await client.request(method, to.host, to.port, target, forward, body)
    except ConnectFailed as exc:
        lease.release()
        metrics.count_answer(name, 502, 0)
        raise UpstreamUnreachable(f"model '{name}' is unreachable: {exc}") from exc
    except UpstreamError as exc:
        lease.release()
        metrics.count_answer(name, 502, 0)
        raise UpstreamFailed(f"model '{name}' did not answer: {type(exc).__name__}: {exc}") from exc
    except BaseException:
        lease.release()
        raise
    response_headers = [(k, v) for k, v in upstream.headers if k not in _DROP_RESPONSE_HEADERS]
    status = upstream.status

    if whole or not (upstream.header(b"content-type") or b"").startswith(b"text/event-stream"):
        try:
            # A child of this router is trusted with the size of its answer; another server is not.
            data = await upstream.read(None if record.is_local else MAX_FOREIGN_ANSWER_BYTES)
        except UpstreamError as exc:
            metrics.count_answer(name, 502, 0)
            raise UpstreamFailed(f"model '{name}' failed while answering: {type(exc).__name__}") from exc
        finally:
            upstream.release()
            lease.release()
        metrics.count_answer(name, status, len(data))
        return _response(data, status, response_headers)

    metrics.count_answer(name, status, 0)

    async def stream() -> AsyncIterator[bytes]:
        relayed = 0
        ended = False
        try:
            async for chunk in upstream.chunks():
                relayed += len(chunk)
                yield chunk
            ended = True
        except UpstreamError as exc:
            ended = True
            log.warning("[%s] stream broke off: %s: %s", name, type(exc).__name__, exc)
            yield _sse_error(f"model '{name}' stopped in the middle of the stream ({type(exc).__name__})")
        finally:
            try:
                if not ended and on_abandoned is not None:
                    on_abandoned()
            except Exception:  # noqa: BLE001 - the relay's own lease and connection go whatever it does
                log.exception("[%s] after a client left its stream", name)
            upstream.release()  # a connection left in the middle of an answer is closed
            lease.release()
            metrics.count_relayed(name, relayed)

    response = StreamingResponse(stream(), status_code=status)
    response.raw_headers.extend(response_headers)
    return response


def _response(data: bytes, status: int, headers: list[tuple[bytes, bytes]]) -> Response:
    """A response with exactly the child's headers (repeated ones included) and this body."""
    response = Response(data, status_code=status)
    response.raw_headers.extend(headers)
    return response
