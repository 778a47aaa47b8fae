"""Relaying a request to a child and its answer back, chunk by chunk.

One shared httpx.AsyncClient. An SSE answer is relayed as its bytes arrive; if the child dies in
the middle, the client gets a final SSE error event and the end of the stream, never a hang. Other
answers are small JSON bodies: they are read whole, so a child that dies mid-answer becomes a
clean 502 instead of a truncated body. The model's lease is held until the relay ends.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import httpx
from fastapi.responses import Response, StreamingResponse

from router.errors import UpstreamFailed
from router.registry import Lease
from router.settings import RouterSettings

log = logging.getLogger(__name__)

# Not forwarded to the child: hop-by-hop headers, what httpx sets itself, and credentials (children
# never see the router's API key).
_DROP_REQUEST_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding",
                         "te", "upgrade", "authorization", "x-api-key", "accept-encoding",
                         "proxy-authorization"}
_DROP_RESPONSE_HEADERS = {"content-length", "connection", "keep-alive", "transfer-encoding", "date",
                          "server"}


def make_client(settings: RouterSettings) -> httpx.AsyncClient:
    timeout = httpx.Timeout(connect=settings.child_connect_timeout_s, read=settings.timeout_s,
                            write=settings.timeout_s, pool=None)
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    return httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)


def _sse_error(message: str) -> bytes:
    body = {"error": {"code": 502, "message": message, "type": "server_error"}}
    return f"data: {json.dumps(body)}\n\n".encode()


async def relay(client: httpx.AsyncClient, lease: Lease, method: str, path: str, query: str,
                headers: list[tuple[str, str]], body: bytes) -> Response:
    """Send the request to the lease's child and return the response to give the client."""
    record = lease.record
    name = record.name
    metrics = lease.registry.metrics
    if record.port is None:
        lease.release()
        raise UpstreamFailed(f"model '{name}' is not running")
    url = f"http://127.0.0.1:{record.port}{path}" + (f"?{query}" if query else "")
    forward = [(k, v) for k, v in headers if k.lower() not in _DROP_REQUEST_HEADERS]
    request = client.build_request(method, url, headers=forward, content=body)
    try:
        upstream = await client.send(request, stream=True)
    except httpx.HTTPError as exc:
        lease.release()
        metrics.requests.labels(name, "502").inc()
        raise UpstreamFailed(f"model '{name}' did not answer: {type(exc).__name__}: {exc}") from exc
    except BaseException:
        lease.release()
        raise
    metrics.requests.labels(name, str(upstream.status_code)).inc()
    response_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE_HEADERS}
    content_type = upstream.headers.get("content-type", "")

    if not content_type.startswith("text/event-stream"):
        try:
            data = await upstream.aread()
        except httpx.HTTPError as exc:
            raise UpstreamFailed(f"model '{name}' failed while answering: {type(exc).__name__}") from exc
        finally:
            await upstream.aclose()
            lease.release()
        metrics.proxied_bytes.labels(name).inc(len(data))
        return Response(data, status_code=upstream.status_code, headers=response_headers)

    async def stream() -> AsyncIterator[bytes]:
        relayed = 0
        try:
            async for chunk in upstream.aiter_raw():
                relayed += len(chunk)
                yield chunk
        except httpx.HTTPError as exc:
            log.warning("[%s] stream broke off: %s: %s", name, type(exc).__name__, exc)
            yield _sse_error(f"model '{name}' stopped in the middle of the stream ({type(exc).__name__})")
        finally:
            await upstream.aclose()
            lease.release()
            metrics.proxied_bytes.labels(name).inc(relayed)

    return StreamingResponse(stream(), status_code=upstream.status_code, headers=response_headers)
