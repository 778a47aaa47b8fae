"""How modelyard's HTTP servers listen: the router's and every child's.

- The listening socket is created with `IPPROTO_TCP` and TCP_NODELAY. asyncio sets TCP_NODELAY on
  an accepted connection only when the listening socket's `proto` is IPPROTO_TCP; a socket made
  with proto 0 gives connections with Nagle's algorithm on, and since uvicorn writes a response's
  headers and body in two writes, every response on a reused connection then waited about 40 ms
  for the client's delayed ACK.
- The event loop is uvloop (uvicorn[standard] installs it): it sets TCP_NODELAY on its own and
  costs less per request than the stock loop, which matters for a proxy.
- Request headers are capped (431) before they are buffered: httptools keeps a header in memory
  until it is complete, so without a cap one client could make the process hold any number of
  bytes before the API key is ever checked.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Literal, TypeVar

import uvicorn
import uvloop
from fastapi import FastAPI
from starlette.types import Receive, Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from child.openai_http import error_bytes

# A request served through BoundedHeadersProtocol carries its ClientState under this key in its
# ASGI scope: whether the client's connection was lost before the response was done, and what to
# call when it is.
CLIENT_STATE = "modelyard.client"

# The whole header section of one request (request line and every header). Browsers send a few
# KiB; llama-server's HTTP library allows 8 KiB per line.
MAX_HEADER_BYTES = 64 * 1024
LOOPBACK = "127.0.0.1"

T = TypeVar("T")


def listening_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A bound, listening, non-blocking TCP socket whose connections have TCP_NODELAY."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Linux hands this on to accepted sockets; asyncio sets it again because proto is TCP.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free a moment ago (for servers that must be told their port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def http_server(app: Any, graceful_shutdown_s: float,
                lifespan: Literal["auto", "on", "off"] = "auto") -> uvicorn.Server:
    """A uvicorn server for `app` with modelyard's protocol; serve it with `serve(sockets=[...])`."""
    # No X-Forwarded-* rewriting: nothing here reads the client's address, and it costs per request.
    config = uvicorn.Config(app, http=BoundedHeadersProtocol, log_config=None, access_log=False,
                            timeout_graceful_shutdown=int(graceful_shutdown_s), lifespan=lifespan,
                            proxy_headers=False)
    return uvicorn.Server(config)


def fastapi_options() -> dict[str, Any]:
    """Keyword arguments for FastAPI(...): its native OpenTelemetry hook off, where FastAPI has one.
    It asks the OpenTelemetry providers (and os.environ) on every request; both servers export
    Prometheus metrics of their own, and on the router's proxy path it cost 3 % of the CPU."""
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters:
        return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    return {}


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run the process's main coroutine on uvloop."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def header_too_large_response(limit: int) -> bytes:
    body = error_bytes(431, f"request headers over {limit} bytes")
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


class _CoalescingTransport:
    """A connection's transport that sends a response's header block together with its body.

    uvicorn writes a response's headers and its body separately: two syscalls and, with
    TCP_NODELAY, two TCP segments for every small answer (on the router's proxy path the two
    writes were 17 % of its CPU). The header block is held back and goes out with the next write,
    at once; if none comes before the event loop's next turn (a stream whose first chunk is not
    ready), it goes out alone then. Everything else is the transport's own.
    """

    __slots__ = ("_transport", "_loop", "_held")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held = b""

    def write(self, data: bytes) -> None:
        if self._held:
            data, self._held = self._held + data, b""
        elif data.startswith(b"HTTP/1.1 ") and data.endswith(b"\r\n\r\n"):
            self._held = data
            self._loop.call_soon(self._flush)
            return
        self._transport.write(data)

    def _flush(self) -> None:
        held, self._held = self._held, b""
        if held and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class ClientState:
    """One request's view of its client's connection, kept up to date by the protocol."""

    __slots__ = ("gone", "callbacks")

    def __init__(self) -> None:
        self.gone = False
        self.callbacks: list[Callable[[], None]] = []

    def lost(self) -> None:
        self.gone = True
        for callback in list(self.callbacks):
            callback()


class BoundedHeadersProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with three additions:

    - Whatever a request sends that is not its body (request line, headers, chunk framing,
      trailers) is capped at `max_header_bytes`: over it, 431 and the connection closes. Bytes are
      counted as they arrive, before httptools buffers them, and fed in pieces of at most the room
      left; body bytes do not count, so a large body in the same read as its headers is fine.
    - Each request gets a ClientState in its scope, told when the connection is lost before its
      response is done: every unfinished request of the connection, pipelined ones included
      (uvicorn itself only marks the latest).
    - A response's header block goes out with its body in one write (_CoalescingTransport).
    """

    max_header_bytes = MAX_HEADER_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fed_bytes = 0  # of the current request, fed to the parser
        self._body_bytes = 0  # of those, body
        self._unfinished: list[tuple[Any, ClientState]] = []  # (uvicorn's cycle, its client state)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(_CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        while data:
            room = self.max_header_bytes - (self._fed_bytes - self._body_bytes)
            if room <= 0:
                self.transport.write(header_too_large_response(self.max_header_bytes))
                self.transport.close()
                return
            piece, data = data[:room], data[room:]
            self._fed_bytes += len(piece)
            super().data_received(piece)
            if self.transport.is_closing():
                return

    def on_headers_complete(self) -> None:
        state = ClientState()
        self.scope[CLIENT_STATE] = state  # type: ignore[literal-required]
        super().on_headers_complete()
        self._unfinished = [(c, s) for c, s in self._unfinished if not c.response_complete]
        self._unfinished.append((self.cycle, state))

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._fed_bytes = self._body_bytes = 0  # the next request on this connection counts anew
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        unfinished, self._unfinished = self._unfinished, []
        for cycle, state in unfinished:
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
                state.lost()
        super().connection_lost(exc)


class ClientDisconnected(Exception):
    """The client went away while its request was being worked on; nobody reads the answer."""


async def read_body(receive: Receive) -> bytes:
    """A request's whole body, straight from the ASGI channel."""
    first = await receive()
    if first["type"] == "http.disconnect":
        raise ClientDisconnected()
    body = first.get("body", b"")
    if not first.get("more_body"):
        return body
    chunks = [body]
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


class cancelled_if_client_leaves:  # noqa: N801 - used like a function: `async with cancelled_if_client_leaves(...)`
    """Run the block; if the client disconnects meanwhile, cancel it and raise ClientDisconnected.

    Neither Starlette nor uvicorn cancels a handler whose client left, so without this a request
    that waits for a model, or for a non-streamed answer, keeps working for nobody. The block runs
    in the caller's own task. Served through BoundedHeadersProtocol, the protocol calls back when
    the connection is lost, which costs nothing per request (this is on every proxied request's
    path); under another server a watcher task reads `receive` until it reports the disconnect,
    so the request's body must have been read already.
    """

    __slots__ = ("_scope", "_receive", "_task", "_watcher", "_client", "_gone", "_inside")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self._scope = scope
        self._receive = receive
        self._gone = False
        self._inside = True
        self._watcher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._client: ClientState | None = self._scope.get(CLIENT_STATE)
        if self._client is not None:
            if self._client.gone:
                raise ClientDisconnected()  # it left before this block began
            self._client.callbacks.append(self._on_disconnect)
        else:
            self._watcher = task.get_loop().create_task(self._watch())

    def _on_disconnect(self) -> None:
        if self._inside:  # the block is suspended at an await: the cancellation lands there
            self._gone = True
            self._task.cancel()

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self._on_disconnect()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        self._inside = False
        if self._client is not None:
            self._client.callbacks.remove(self._on_disconnect)
        if self._watcher is not None:
            self._watcher.cancel()
        if exc_type is asyncio.CancelledError and self._gone:
            self._task.uncancel()
            raise ClientDisconnected() from None
