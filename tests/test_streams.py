"""Resumable streams through the router: disconnect, resume, replay, cancel, replace, expiry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conftest import fake_bin, tiny_preset


def _post_stream(router, conv_id: str, model: str, max_tokens: int, stop_after_bytes: int | None) -> bytes:
    """POST a resumable stream; read until at least stop_after_bytes (None: to the end), then leave."""
    body = {"model": model, "prompt": "hello", "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True}
    received = b""
    with router.client.stream("POST", "/v1/completions", json=body,
                              headers={"X-Conversation-Id": conv_id}) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            received += chunk
            if stop_after_bytes is not None and len(received) >= stop_after_bytes:
                break
    return received


def _get_stream(router, path: str, **params) -> tuple[int, bytes]:
    with router.client.stream("GET", path, params=params) as response:
        return response.status_code, response.read()


def _wait_done(router, conv_id: str, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = router.client.post("/v1/streams/lookup", json={"conversation_ids": [conv_id]}).json()
        if found and found[0]["is_done"]:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"stream {conv_id} did not finish")


@pytest.mark.parametrize("cut", [1, 400, 3000])
def test_streams_resume_joins_exactly_into_the_whole_stream(start_router, tiny_model: Path, cut: int) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny"]))
    conv = f"conv-{cut}"
    before = _post_stream(router, conv, "tiny", 300, stop_after_bytes=cut)
    status, after = _get_stream(router, "/v1/stream", conv_id=conv, **{"from": str(len(before))})
    assert status == 200
    whole = before + after
    assert whole.endswith(b"data: [DONE]\n\n")
    assert whole.count(b"data: [DONE]") == 1
    # Replaying from 0 after the end gives the whole stream again, byte for byte (path form too).
    status, replay = _get_stream(router, f"/v1/stream/{conv}", **{"from": "0"})
    assert status == 200 and replay == whole
    info = _wait_done(router, conv)
    assert info["total_bytes"] == len(whole) and info["completed_at"] >= info["started_at"]


def test_streams_without_header_are_not_kept(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny"]))
    router.client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3, "stream": True})
    assert router.client.post("/v1/streams/lookup", json={"conversation_ids": ["x"]}).json() == []


def test_streams_lookup_returns_only_the_asked_ids(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["a", "b"]))
    _post_stream(router, "one", "a", 5, None)
    _post_stream(router, "two", "b", 5, None)
    found = router.client.post("/v1/streams/lookup", json={"conversation_ids": ["two", "nobody"]}).json()
    assert [f["conversation_id"] for f in found] == ["two"]
    both = router.client.post("/v1/streams/lookup", json={"conversation_ids": ["one", "two"]}).json()
    assert sorted(f["conversation_id"] for f in both) == ["one", "two"]  # merged from two children
    assert set(both[0]) == {"conversation_id", "is_done", "total_bytes", "started_at", "completed_at"}
    # A body it cannot use is answered with an empty list, as llama.cpp's router does.
    bad = router.client.post("/v1/streams/lookup", json={"ids": []})
    assert (bad.status_code, bad.json()) == (200, [])


def test_streams_unknown_id_and_bad_offset(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny"]))
    status, body = _get_stream(router, "/v1/stream", conv_id="never")
    assert status == 404
    _post_stream(router, "c1", "tiny", 5, None)
    response = router.client.get("/v1/stream", params={"conv_id": "c1", "from": "abc"})
    assert response.status_code == 400 and response.json()["error"]["message"] == "Invalid 'from' offset"
    assert router.client.get("/v1/stream").status_code == 400


def test_streams_offset_lost_with_a_small_buffer(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny"], extra="stream-buffer-bytes = 2048\n"))
    whole = _post_stream(router, "small", "tiny", 200, None)
    assert len(whole) > 4096
    response = router.client.get("/v1/stream", params={"conv_id": "small", "from": "0"})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "Stream offset lost, please restart"
    status, tail = _get_stream(router, "/v1/stream", conv_id="small", **{"from": str(len(whole) - 100)})
    assert status == 200 and tail == whole[-100:]


def test_streams_expire_after_their_ttl(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny"], extra="stream-ttl-seconds = 0.3\n"))
    _post_stream(router, "brief", "tiny", 5, None)
    deadline = time.monotonic() + 30
    while router.client.post("/v1/streams/lookup", json={"conversation_ids": ["brief"]}).json():
        assert time.monotonic() < deadline, "the finished stream never expired"
        time.sleep(0.05)
    assert router.client.get("/v1/stream", params={"conv_id": "brief"}).status_code == 404


def test_streams_delete_stops_the_generation(start_router, smollm2_model: Path) -> None:
    router = start_router(f"[smol]\nmodel = {smollm2_model}\nc = 2048\nnp = 1\nt = 2\n")
    _post_stream(router, "long", "smol", 1500, stop_after_bytes=200)
    assert router.client.get("/slots", params={"model": "smol"}).json()[0]["is_processing"] is True
    assert router.client.delete("/v1/stream", params={"conv_id": "long"}).status_code == 204
    assert router.client.delete("/v1/stream/long").status_code == 204  # idempotent
    assert router.client.delete("/v1/stream/never-was").status_code == 204
    deadline = time.monotonic() + 30
    while router.client.get("/slots", params={"model": "smol"}).json()[0]["is_processing"]:
        assert time.monotonic() < deadline, "DELETE did not free the slot"
        time.sleep(0.05)
    assert router.client.post("/v1/streams/lookup", json={"conversation_ids": ["long"]}).json() == []


def test_streams_new_post_replaces_the_live_session(start_router, smollm2_model: Path) -> None:
    router = start_router(f"[smol]\nmodel = {smollm2_model}\nc = 2048\nnp = 2\nt = 2\n")
    first = _post_stream(router, "same", "smol", 1000, stop_after_bytes=200)
    slots = router.client.get("/slots", params={"model": "smol"}).json()
    assert sum(s["is_processing"] for s in slots) == 1
    second = _post_stream(router, "same", "smol", 5, None)
    assert second.endswith(b"data: [DONE]\n\n")
    status, replay = _get_stream(router, "/v1/stream", conv_id="same")
    assert status == 200 and replay == second and replay != first
    # The first generation was cancelled: no slot is busy any more.
    deadline = time.monotonic() + 30
    while any(s["is_processing"] for s in router.client.get("/slots", params={"model": "smol"}).json()):
        assert time.monotonic() < deadline, "the replaced generation kept running"
        time.sleep(0.05)


def test_streams_get_answers_503_while_the_owner_is_loading(start_router, tmp_path: Path) -> None:
    slow_marker = tmp_path / "load-slowly"
    router = start_router(f"[fake]\nmodel = /unused.gguf\n"
                          f"bin = {fake_bin('--tokens', '3', '--slow-load-if', str(slow_marker))}\n")
    with router.client.stream("POST", "/v1/chat/completions", json={"model": "fake", "stream": True},
                              headers={"X-Conversation-Id": "owned"}) as response:
        assert response.read().endswith(b"data: [DONE]\n\n")
    router.client.post("/models/unload", json={"model": "fake"})
    router.wait_status("fake", "unloaded")
    slow_marker.touch()
    router.client.post("/models/load", json={"model": "fake"})
    assert router.status("fake") == "loading"
    response = router.client.get("/v1/stream", params={"conv_id": "owned"})
    assert response.status_code == 503
    assert response.json()["error"]["message"] == "Stream owner model is loading, retry later"
    assert response.headers["retry-after"] == "1"


def test_streams_routes_need_the_api_key(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny"]), "--api-key", "sekrit")
    assert router.client.get("/health").status_code == 200
    for method, path in [("GET", "/v1/stream?conv_id=x"), ("DELETE", "/v1/stream/x"),
                         ("POST", "/v1/streams/lookup"), ("GET", "/models"), ("GET", "/models/sse")]:
        response = router.client.request(method, path)
        assert response.status_code == 401, path
        assert response.json()["error"]["type"] == "authentication_error"
    ok = router.client.post("/v1/streams/lookup", json={"conversation_ids": []},
                            headers={"Authorization": "Bearer sekrit"})
    assert ok.status_code == 200 and ok.json() == []
    assert router.client.get("/models", headers={"x-api-key": "sekrit"}).status_code == 200


def test_streams_a_delete_while_the_request_is_prepared_stops_it_before_it_starts() -> None:
    """The child's side of DELETE /v1/stream: a request of the conversation that is still being
    prepared (its body read, templated, its grammar compiled) when the DELETE comes never starts
    its session; of two requests of one conversation, the later one wins whichever is ready first."""
    from child.completions import refuse_if_deleted
    from child.openai_schema import RequestError
    from child.stream_sessions import SessionStore

    async def chunks() -> AsyncIterator[bytes]:
        yield b"data: x\n\n"

    async def scenario() -> None:
        store = SessionStore(cap_bytes=1024, ttl_s=60)
        cancelled: list[str] = []
        with store.reserve("c1") as deleted, store.reserve("c2") as other:
            assert deleted is not None and other is not None
            assert store.cancel("c1") is False  # no session yet, but the reservation hears of it
            with pytest.raises(RequestError, match="was deleted") as refused:
                refuse_if_deleted(store, deleted, lambda: cancelled.append("c1"))
            assert refused.value.status == 409 and cancelled == ["c1"]  # its engine request is cancelled
            refuse_if_deleted(store, other, lambda: cancelled.append("c2"))  # another conversation goes on
        assert cancelled == ["c1"]
        with store.reserve("c3") as first, store.reserve("c3") as second:
            assert first is not None and second is not None
            refuse_if_deleted(store, second, lambda: cancelled.append("second"))
            store.start(second, chunks())  # the later request is ready first: it runs
            with pytest.raises(RequestError, match="replaced by a later request"):
                refuse_if_deleted(store, first, lambda: cancelled.append("first"))
        assert cancelled == ["c1", "first"]
        with store.reserve(None) as nothing:
            assert nothing is None
        assert store._reserved == {}  # nothing is left behind, whatever was prepared
        store.close()

    asyncio.run(scenario())
