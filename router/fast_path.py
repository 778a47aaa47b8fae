"""The proxied POST routes, served in front of FastAPI's own layers.

A proxied completion needs nothing FastAPI adds per request (route matching over every route,
dependency solving, its exception middleware): measured on the router's hot path, those layers
were about a third of the router's CPU per request. This ASGI layer serves the POSTs of the
proxied routes itself, by exact path, and hands everything else to the FastAPI app unchanged. It
sits inside the body limit and API key checks, so those apply as to every other route. The same
routes stay declared in FastAPI for the OpenAPI document.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from fastapi import FastAPI, Response
from starlette.types import Receive, Scope, Send

from child.serving import read_body
from router.errors import error_response_for

Handler = Callable[[Scope, Receive, bytes], Awaitable[Response]]


class ProxiedPostsFastPath:
    """Takes a POST to one of `paths`, reads its body and answers with `handler`'s response."""

    def __init__(self, app: FastAPI, paths: Iterable[str], handler: Handler) -> None:
        self.app = app
        self.paths = frozenset(paths)
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        scope["app"] = self.app  # what FastAPI would set: handlers reach app.state through it
        try:
            response = await self.handler(scope, receive, await read_body(receive))
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI-shaped answer
            response = error_response_for(exc)
        await response(scope, receive, send)
