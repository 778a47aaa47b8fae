"""Request bodies over --max-body-bytes get 413 before they are read whole (pure ASGI)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from child.openai_http import error_bytes


class BodyLimitMiddleware:
    """Refuses a body over `max_bytes` with 413: at once when Content-Length says so, else as soon
    as the bytes received pass the limit. The app then sees the client as gone (its body reader
    gets `http.disconnect`), whatever it answers to that is dropped, and the 413 goes out instead:
    no exception has to travel through the app's own error handling to get here."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and b"transfer-encoding" not in headers:
            if int(declared) > self.max_bytes:
                await self._refuse(send)
            else:
                # The HTTP parser frames the body by its declared length: it cannot grow past it.
                await self.app(scope, receive, send)
            return
        received = 0
        over = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over:
                return  # the app's answer to a body cut short: the 413 replaces it
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, counting_receive, guarded_send)
        if over and not started:
            await self._refuse(send)
    async def _refuse(self, send: Send) -> None:
        body = error_bytes(413, f"request body over {self.max_bytes} bytes (--max-body-bytes)")
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
