"""The router's HTTP client towards its children (router/upstream_client.py), against a scripted
HTTP server on 127.0.0.1: each test's server answers exactly as a misbehaving child might.

These are the cases an outside review broke it with: an interim `100 Continue` taken for the
answer (and the real answer then handed to the next request), a request sent again on every
idle connection after a timeout, and a connection put back into the pool with its reading paused.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import pytest

from router.upstream_client import UpstreamClient, UpstreamError

Handler = Callable[[int, bytes, asyncio.StreamWriter], Awaitable[bool]]


class ScriptedServer:
    """Reads requests (head and Content-Length body); `handler(n, request, writer)` answers the
    n-th request of the server and returns False to close the connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[bytes] = []
        self.connections = 0

    async def __aenter__(self) -> ScriptedServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                if not await self.handler(len(self.requests), request, writer):
                    break
        writer.close()


def answer(body: bytes, status: str = "200 OK") -> bytes:
    return b"HTTP/1.1 " + status.encode() + b"\r\ncontent-length: %d\r\n\r\n" % len(body) + body


@pytest.mark.anyio
async def test_upstream_interim_answers_are_not_the_answer() -> None:
    async def handler(n: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await asyncio.sleep(0.2)  # the real answer comes later, as a generation's would
        writer.write(answer(b"answer %d" % n))
        return True

    async with ScriptedServer(handler) as server:
        client = UpstreamClient(5.0, 30.0)
        for n in (1, 2, 3):
            response = await client.request("POST", "127.0.0.1", server.port, "/x", [], b"{}")
            assert response.status == 200
            assert await response.read() == b"answer %d" % n  # each request its own answer
            response.release()
        assert server.connections == 1  # and the connection was reused each time
        await client.close()


@pytest.mark.anyio
async def test_upstream_a_timed_out_request_is_never_sent_again() -> None:
    async def handler(n: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        if request.startswith(b"POST"):
            await asyncio.sleep(2.0)  # still working when the client gives up
        writer.write(answer(b"ok"))
        return True

    async with ScriptedServer(handler) as server:
        client = UpstreamClient(5.0, 30.0)
        idle = await asyncio.gather(*(client.request("GET", "127.0.0.1", server.port, "/", []) for _ in range(3)))
        for response in idle:
            await response.read()
            response.release()  # three idle connections in the pool
        with pytest.raises(UpstreamError, match="no answer for 0.5 s"):
            await client.request("POST", "127.0.0.1", server.port, "/slow", [], b"{}", read_timeout_s=0.5)
        await asyncio.sleep(2.5)
        assert [r.split(b" ")[0] for r in server.requests].count(b"POST") == 1
        await client.close()


@pytest.mark.anyio
async def test_upstream_a_request_on_a_connection_the_server_closed_is_sent_once_more() -> None:
    async def handler(n: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        if n == 2:
            return False  # the server had dropped this idle connection: it closes without answering
        writer.write(answer(b"answer %d" % n))
        return True

    async with ScriptedServer(handler) as server:
        client = UpstreamClient(5.0, 30.0)
        first = await client.request("GET", "127.0.0.1", server.port, "/", [])
        await first.read()
        first.release()
        second = await client.request("POST", "127.0.0.1", server.port, "/", [], b"{}")
        assert await second.read() == b"answer 3"  # sent again, once, on a new connection
        second.release()
        assert server.connections == 2 and len(server.requests) == 3
        await client.close()


@pytest.mark.anyio
async def test_upstream_a_connection_left_mid_answer_is_not_reused() -> None:
    # Just over what the client buffers before it pauses reading: the answer's last bytes come in
    # the read that pauses it, so the answer is complete, unread and the connection paused.
    big = b"x" * 1_100_000

    async def handler(n: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer(big if n == 1 else b"small"))
        await writer.drain()
        return True

    async with ScriptedServer(handler) as server:
        client = UpstreamClient(5.0, 30.0)
        abandoned = await client.request("GET", "127.0.0.1", server.port, "/big", [])
        await asyncio.sleep(0.5)  # the answer arrives, the client pauses reading
        abandoned.release()  # nobody read it: the connection must go, not back to the pool
        began = asyncio.get_running_loop().time()
        next_one = await client.request("GET", "127.0.0.1", server.port, "/small", [], read_timeout_s=5.0)
        assert await next_one.read() == b"small"
        assert asyncio.get_running_loop().time() - began < 2.0  # not a wait for the read timeout
        next_one.release()
        assert server.connections == 2
        await client.close()


@pytest.mark.anyio
async def test_upstream_bytes_nobody_asked_for_close_a_parked_connection() -> None:
    async def handler(n: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer(b"answer %d" % n))
        if n == 1:
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.write(answer(b"an answer to nothing"))  # arrives while the connection is parked
        return True

    async with ScriptedServer(handler) as server:
        client = UpstreamClient(5.0, 30.0)
        first = await client.request("GET", "127.0.0.1", server.port, "/", [])
        assert await first.read() == b"answer 1"
        first.release()
        await asyncio.sleep(0.5)
        second = await client.request("GET", "127.0.0.1", server.port, "/", [])
        assert await second.read() == b"answer 2"
        second.release()
        assert server.connections == 2
        await client.close()


@pytest.mark.anyio
async def test_upstream_a_slow_reader_is_not_taken_for_a_silent_server() -> None:
    big = b"y" * 3_000_000

    async def handler(n: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer(big))
        await writer.drain()
        return True

    async with ScriptedServer(handler) as server:
        client = UpstreamClient(5.0, 30.0)
        response = await client.request("GET", "127.0.0.1", server.port, "/", [], read_timeout_s=0.5)
        await asyncio.sleep(1.5)  # the reader (the router's own client, say) is slow: reading is paused
        assert len(await response.read()) == len(big)
        response.release()
        await client.close()


@pytest.mark.anyio
async def test_upstream_a_request_resent_after_a_closed_connection_is_not_called_unsent() -> None:
    """The server read the request on a reused connection, then went away (an OOM kill, say):
    the resend cannot connect. That is no ConnectFailed, which would send the request to another
    replica although the first may have started it."""
    from router.upstream_client import ConnectFailed

    async def handler(n: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
        if n == 1:
            writer.write(answer(b"first"))
            return True
        await asyncio.sleep(0.1)  # it works on it, then dies without answering
        server.server.close()
        return False

    client = UpstreamClient(connect_timeout_s=1.0, read_timeout_s=5.0)
    async with ScriptedServer(handler) as server:
        first = await client.request("GET", "127.0.0.1", server.port, "/", [])
        assert await first.read() == b"first"
        first.release()
        with pytest.raises(UpstreamError) as raised:
            await client.request("POST", "127.0.0.1", server.port, "/v1/completions", [], b"{}")
        assert not isinstance(raised.value, ConnectFailed)
        assert len(server.requests) == 2
    await client.close()
