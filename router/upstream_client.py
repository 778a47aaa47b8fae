"""The router's HTTP/1.1 client towards its children: keep-alive connections on loopback.

Why not aiohttp or httpx: on the router's hot path (one proxied completion), building aiohttp's
request object alone cost 10 % of the router's CPU and aiohttp in all 30 %; httpx cost more. This
client does only what a proxy to a known set of local servers needs: it writes the request in one
write, parses the answer with httptools (the C parser uvicorn uses for the other direction), keeps
connections open per port, and hands the body over as it arrives, with flow control.

- Bodies are framed by Content-Length, chunked encoding, or the end of the connection.
- A connection is reused only after an answer that was read to its end and allows keep-alive; an
  idle connection is dropped after IDLE_S, before the servers' own keep-alive timeout (5 s for
  uvicorn and llama-server) can close it under a request.
- A request sent on a reused connection that the server had closed meanwhile (the connection
  ends before any byte of an answer) is sent again, once, on a new connection: the server never
  saw it. Nothing else is ever sent twice (a timeout is not retried).
- Interim answers (`100 Continue`, ...) are skipped: only the final answer is the answer. Bytes
  that arrive on a parked connection, which no request is waiting for, close it.
- Timeouts: connecting (`connect_timeout_s`), and the wait for each next piece of the answer
  (`read_timeout_s`, the router's --timeout): one timer per request, pushed on by every byte that
  arrives, rather than a timeout object around every wait.

Errors are UpstreamError (an OSError): refused, reset, closed mid-answer, malformed, timed out.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Sequence

import httptools

IDLE_S = 2.0
PAUSE_ABOVE_BYTES = 1024 * 1024  # buffered and unread: stop reading the socket until it drains


class UpstreamError(OSError):
    pass


class ConnectFailed(UpstreamError):
    """No connection: the request was not sent at all."""


class _Connection(asyncio.Protocol):
    """One TCP connection and the answer being read on it (httptools callbacks)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.lost_before_answer = False  # closed by the server before a byte of the current answer
        self.parked = False  # in the pool: no request is waiting for anything on it
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._timer: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self._disarm()
        self.parked = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._interim = False  # reading a 1xx answer, which is not the answer
        self.keep_alive = False
        self.headers_done = self.loop.create_future()
        self.complete = False
        self.received_any = False
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._error: UpstreamError | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._framed = True  # False: the body runs to the end of the connection
        self._last_activity = 0.0
        self._timeout_s = 0.0

    # -- the read timeout -----------------------------------------------------------------------

    def arm(self, timeout_s: float) -> None:
        """From now on, `timeout_s` without a byte from the server ends the exchange."""
        self._timeout_s = timeout_s
        self._last_activity = self.loop.time()
        self._timer = self.loop.call_later(timeout_s, self._check_silence)

    def _check_silence(self) -> None:
        if self._paused:  # the router stopped reading (its client is slow): not the server's silence
            self._last_activity = self.loop.time()
        silent_s = self.loop.time() - self._last_activity
        if silent_s < self._timeout_s:
            self._timer = self.loop.call_later(self._timeout_s - silent_s, self._check_silence)
            return
        self._timer = None
        self._fail(UpstreamError(f"no answer for {self._timeout_s:g} s"))
        self._close()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        if self.parked:  # nobody asked: an answer to nothing would be read as the next one's
            self._close()
            return
        self.received_any = True
        self._last_activity = self.loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"malformed answer: {exc}"))
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._disarm()
        if self.headers_done.done() and not self._framed and not self.complete:
            self.on_message_complete()  # a body that ends with the connection has ended
            return
        if not self.complete:
            self.lost_before_answer = not self.received_any
            self._fail(UpstreamError(f"connection closed {'in the middle of' if self.received_any else 'before'} "
                                     f"the answer{f': {exc}' if exc else ''}"))

    # -- httptools callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._interim = True  # 100 Continue and the like: the answer is still to come
            return
        self.status = status
        self.keep_alive = self._parser.should_keep_alive()
        names = {name for name, _ in self.headers}
        self._framed = b"content-length" in names or b"transfer-encoding" in names or self.status in (204, 304)
        if not self.headers_done.done():
            self.headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > PAUSE_ABOVE_BYTES and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.complete = True
        self._disarm()
        self._wake()

    # -- the reading side -----------------------------------------------------------------------

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        if not self.headers_done.done():
            self.headers_done.set_exception(error)
            self.headers_done.exception()  # retrieved: an answer nobody waits for is not an error
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    @property
    def reusable(self) -> bool:
        """The answer was read to its end, nothing of it is left, and the server keeps the connection."""
        return self.complete and self.keep_alive and not self.closed and not self._chunks and not self._paused

    def _close(self) -> None:
        self.closed = True
        self._disarm()
        if self.transport is not None:
            self.transport.close()

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body; None at its end."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered <= PAUSE_ABOVE_BYTES // 2 and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return chunk
            if self.complete:
                return None
            if self._error is not None:
                raise self._error
            self._wakeup = self.loop.create_future()
            try:
                await self._wakeup
            finally:
                self._wakeup = None


class UpstreamResponse:
    """An answer whose status and headers have arrived; read the body, then `release()`."""

    def __init__(self, client: UpstreamClient, key: tuple[str, int], connection: _Connection) -> None:
        self._client = client
        self._key = key
        self._connection = connection
        self.status = connection.status
        self.headers = connection.headers  # (lowercase name, value), as received
        self._released = False

    def header(self, name: bytes) -> bytes | None:
        return next((value for key, value in self.headers if key == name), None)

    async def chunks(self) -> AsyncIterator[bytes]:
        while (chunk := await self._connection.next_chunk()) is not None:
            yield chunk

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body; beyond `limit` bytes, an UpstreamError (and the connection is closed)."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self.chunks():
            size += len(chunk)
            if limit is not None and size > limit:
                raise UpstreamError(f"the answer is over {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Give the connection back for the next request if the answer was read whole, else close it."""
        if self._released:
            return
        self._released = True
        connection = self._connection
        connection._disarm()
        if connection.reusable:
            self._client._park(self._key, connection)
        else:
            connection._close()


class UpstreamClient:
    def __init__(self, connect_timeout_s: float, read_timeout_s: float) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._idle: dict[tuple[str, int], list[_Connection]] = {}

    async def request(self, method: str, host: str, port: int, target: str,
                      headers: list[tuple[bytes, bytes]], body: bytes = b"",
                      read_timeout_s: float | None = None) -> UpstreamResponse:
        """Send a request and wait for the answer's status and headers (`read_timeout_s` bounds each
        wait for the answer, this one's or the client's)."""
        key = (host, port)
        head = [f"{method} {target} HTTP/1.1\r\nhost: {host}:{port}\r\n".encode("latin-1")]
        head.extend(name + b": " + value + b"\r\n" for name, value in headers)
        if body or method in ("POST", "PUT", "PATCH"):
            head.append(b"content-length: " + str(len(body)).encode() + b"\r\n")
        message = b"".join(head) + b"\r\n" + body
        timeout_s = self.read_timeout_s if read_timeout_s is None else read_timeout_s
        connection = self._idle_connection(key)
        reused = connection is not None
        resent = False
        while True:
            if connection is None:
                try:
                    connection = await self._connect(host, port)
                except ConnectFailed as exc:
                    if resent:  # the request was written once already: it may have been seen
                        raise UpstreamError(f"{exc} (after the connection it was sent on closed)") from exc
                    raise
            connection._reset()
            assert connection.transport is not None
            connection.transport.write(message)
            connection.arm(timeout_s)
            try:
                await connection.headers_done
            except UpstreamError:
                if reused and connection.lost_before_answer:
                    # The server had closed this idle connection: it never saw the request. Once,
                    # on a new connection.
                    connection, reused, resent = None, False, True
                    continue
                raise
            except BaseException:
                connection._close()  # cancelled: the server sees the request go away
                raise
            return UpstreamResponse(self, key, connection)

    async def _connect(self, host: str, port: int) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, connection = await loop.create_connection(lambda: _Connection(loop), host, port)
        except TimeoutError as exc:
            raise ConnectFailed(f"connecting to {host}:{port} took over {self.connect_timeout_s:g} s") from exc
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from exc
        return connection

    def _idle_connection(self, key: tuple[str, int]) -> _Connection | None:
        pool = self._idle.get(key)
        now = time.monotonic()
        while pool:
            connection = pool.pop()
            if not connection.closed and now - connection.idle_since < IDLE_S:
                return connection
            connection._close()
        self._idle.pop(key, None)  # a child that is gone leaves no entry behind
        return None

    def _park(self, key: tuple[str, int], connection: _Connection) -> None:
        connection.idle_since = time.monotonic()
        connection.parked = True
        pool = self._idle.setdefault(key, [])
        pool[:] = [c for c in pool if not c.closed]
        pool.append(connection)

    async def fetch(self, method: str, host: str, port: int, target: str, timeout_s: float,
                    headers: Sequence[tuple[bytes, bytes]] = (), body: bytes = b"",
                    limit: int | None = None) -> tuple[int, bytes]:
        """A whole small answer (status, body) within `timeout_s` (TimeoutError beyond it), of at
        most `limit` bytes: for probes, scrapes and the router's own calls to other servers."""
        async with asyncio.timeout(timeout_s):
            response = await self.request(method, host, port, target, list(headers), body, read_timeout_s=timeout_s)
            try:
                return response.status, await response.read(limit)
            finally:
                response.release()

    async def close(self) -> None:
        for pool in self._idle.values():
            for connection in pool:
                connection._close()
        self._idle.clear()
