"""API key check for every route but /health (pure ASGI, so streams pass through untouched)."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from child.openai_http import error_bytes

# The dashboard page holds no data: it asks for the key and sends it with every call it makes.
OPEN_PATHS = frozenset({"/health", "/v1/health", "/"})


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...]) -> None:
        self.app = app
        self._keys = [key.encode() for key in api_keys]

    def _presented_key(self, scope: Scope) -> bytes:
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            return auth[7:].strip()
        return headers.get(b"x-api-key", b"").strip()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # No exemption for OPTIONS: a browser's preflight is answered by the CORS layer outside
        # this one (when CORS is on), and any other OPTIONS may reach a model like a GET.
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        presented = self._presented_key(scope)
        # Every key is compared, each in constant time: which one matched leaks no timing.
        if sum(hmac.compare_digest(presented, key) for key in self._keys):
            await self.app(scope, receive, send)
            return
        body = error_bytes(401, "Invalid API Key")
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
