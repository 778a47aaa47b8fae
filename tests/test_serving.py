"""How both servers listen (child/serving.py): TCP_NODELAY on every connection, capped headers.

In-process, on the stock asyncio loop: that is the loop on which a listening socket made with
proto 0 gave connections without TCP_NODELAY (uvloop sets it regardless), and so the one where a
regression would show. A reused connection used to wait ~40 ms for the client's delayed ACK.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from child import serving


async def _app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    answer = b'{"received": %d}' % len(body)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]})
    await send({"type": "http.response.body", "body": answer})


@pytest.fixture
async def served() -> AsyncIterator[tuple[serving.uvicorn.Server, int]]:
    sock = serving.listening_socket("127.0.0.1", 0)
    server = serving.http_server(_app, graceful_shutdown_s=1, lifespan="off")
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    yield server, sock.getsockname()[1]
    server.should_exit = True
    await task


async def _ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> bytes:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length"))
    return head + await reader.readexactly(length)


@pytest.mark.anyio
async def test_serving_listening_socket_and_its_connections_have_tcp_nodelay(served) -> None:  # type: ignore[no-untyped-def]
    server, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(2):  # the second request is the one Nagle's algorithm used to hold back
            answer = await _ask(reader, writer, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200 ")
        connections = list(server.server_state.connections)
        assert connections
        for protocol in connections:
            accepted = protocol.transport.get_extra_info("socket")
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        writer.close()


def test_serving_listening_socket_is_tcp_with_nodelay() -> None:
    sock = serving.listening_socket("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP  # what asyncio checks before it sets TCP_NODELAY
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        sock.close()


@pytest.mark.anyio
async def test_serving_header_cap_counts_each_request_of_a_connection_alone(served) -> None:  # type: ignore[no-untyped-def]
    _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        # A body far larger than the header cap, in the same write as its headers: not a long header.
        body = b"z" * (4 * serving.MAX_HEADER_BYTES)
        post = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        for _ in range(3):
            answer = await _ask(reader, writer, post)
            assert answer.startswith(b"HTTP/1.1 200 ") and b'"received": %d' % len(body) in answer
        # Headers just under the cap pass on the same connection; just over, 431 and the end of it.
        fits = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * (serving.MAX_HEADER_BYTES - 200) + b"\r\n\r\n"
        assert (await _ask(reader, writer, fits)).startswith(b"HTTP/1.1 200 ")
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * serving.MAX_HEADER_BYTES + b"\r\n\r\n")
        refused = await reader.read()
        assert refused.startswith(b"HTTP/1.1 431 ") and b"request headers over" in refused
    finally:
        writer.close()


@pytest.mark.anyio
async def test_serving_a_block_is_cancelled_when_the_connection_is_lost() -> None:
    """Through BoundedHeadersProtocol: the protocol calls back on the lost connection (no task)."""
    outcome: list[str] = []
    entered = asyncio.Event()

    async def slow_app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        await serving.read_body(receive)
        assert isinstance(scope.get(serving.CLIENT_STATE), serving.ClientState)
        try:
            async with serving.cancelled_if_client_leaves(scope, receive):
                entered.set()
                await asyncio.sleep(60)
        except serving.ClientDisconnected:
            outcome.append("cancelled")

    sock = serving.listening_socket("127.0.0.1", 0)
    server = serving.http_server(slow_app, graceful_shutdown_s=1, lifespan="off")
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        await asyncio.wait_for(entered.wait(), 10)
        writer.close()
        for _ in range(200):
            if outcome:
                break
            await asyncio.sleep(0.02)
        assert outcome == ["cancelled"]
    finally:
        server.should_exit = True
        await task


@pytest.mark.anyio
async def test_serving_without_the_protocol_a_watcher_reads_the_disconnect() -> None:
    """Under another ASGI server (no callback list in the scope): a watcher task reads `receive`."""
    gone = asyncio.Event()

    async def receive() -> dict[str, str]:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def work() -> None:
        async with serving.cancelled_if_client_leaves({"type": "http"}, receive):
            await asyncio.sleep(60)

    task = asyncio.create_task(work())
    await asyncio.sleep(0.05)
    gone.set()
    with pytest.raises(serving.ClientDisconnected):
        await asyncio.wait_for(task, 5)


@pytest.mark.anyio
async def test_serving_a_client_already_gone_is_noticed_at_once() -> None:
    client = serving.ClientState()
    client.lost()

    async def never() -> dict[str, str]:
        await asyncio.sleep(60)
        return {"type": "http.disconnect"}

    with pytest.raises(serving.ClientDisconnected):
        async with serving.cancelled_if_client_leaves({"type": "http", serving.CLIENT_STATE: client}, never):
            await asyncio.sleep(60)
