"""The defects an outside review found in the router (issue 10), one regression test each.

Each test fails on the code before its fix: the key-free /v1/health that proxied, unbounded
headers, conversation ids remembered before the child accepted them, a reload racing a queued
load, loads that never time out, spawn failures that left `loading` behind, non-streamed work
that outlived its client, grandchildren that outlived a killed router, the Hugging Face token in
every child's environment, and a crashing child that answered nothing.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import fake_bin, tiny_preset, wait_dead, waiting_for_room

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0,
        "ignore_eos": True}


def _fake(name: str, *flags: str, extra: str = "") -> str:
    return f"[{name}]\nmodel = /unused/{name}.gguf\nbin = {fake_bin(*flags)}\n{extra}\n"


def _wait(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _raw_exchange(url: str, request: bytes, timeout_s: float = 30.0) -> bytes:
    """Send raw bytes to the server, return everything it answers until it closes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(request)
        answer = b""
        with contextlib.suppress(ConnectionResetError, socket.timeout):
            while chunk := sock.recv(65536):
                answer += chunk
    return answer


# -- 1. /v1/health is open, and never more than /health ------------------------------------------

def test_hardening_v1_health_answers_like_health_and_never_reaches_a_model(start_router) -> None:
    router = start_router(_fake("f"), "--api-key", "k3y")
    for path in ("/health", "/v1/health", "/health?model=f", "/v1/health?model=f", "/v1/health?model=nope"):
        answer = router.client.get(path)
        assert answer.status_code == 200 and answer.json() == {"status": "ok"}, path
    # It loaded nothing and told nothing about which models exist.
    assert router.children() == []
    assert router.client.get("/models", headers={"Authorization": "Bearer k3y"}).json()["data"][0]["status"][
        "value"] == "unloaded"
    # Anything else under that name still needs the key.
    for path in ("/v1/health/x?model=f", "/v1/healthz?model=f", "/health/?model=f"):
        assert router.client.get(path).status_code == 401, path


# -- 5. request headers are capped before anything is buffered ----------------------------------

def test_hardening_oversized_headers_get_431_before_the_key_check(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["a"]), "--api-key", "k3y")
    filler = b"x" * (2 * 1024 * 1024)
    answer = _raw_exchange(router.url, b"GET /models HTTP/1.1\r\nHost: x\r\nX-Big: " + filler + b"\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), head[:80]
    assert b'"code": 431' in body and b"invalid_request_error" in body
    # A request line alone can be just as long.
    long_line = _raw_exchange(router.url, b"GET /models?" + filler + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert long_line.startswith(b"HTTP/1.1 431 ")
    # The router is fine, and a normal request whose large body arrives with its headers is not
    # mistaken for a long header.
    assert router.client.get("/health").status_code == 200
    big_prompt = {"model": "a", "prompt": "hello " * 40_000, "max_tokens": 1}
    answer = router.client.post("/v1/completions", json=big_prompt, headers={"Authorization": "Bearer k3y"})
    assert answer.status_code == 400 and "tokens" in answer.json()["error"]["message"]  # the child's answer


def test_hardening_the_child_caps_headers_too(start_child, tiny_model: Path) -> None:
    child = start_child(tiny_model, "-c", "512", "-np", "1", "-t", "1")
    answer = _raw_exchange(child.url, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * 300_000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert child.client.get("/health").status_code == 200


# -- 4. conversation ids: checked first, remembered only once accepted, bounded ------------------

def _conversations(router) -> float:  # type: ignore[no-untyped-def]
    for line in router.client.get("/metrics").text.splitlines():
        if line.startswith("modelyard_router_conversations "):
            return float(line.split()[1])
    raise AssertionError("no modelyard_router_conversations metric")


@pytest.mark.parametrize(("conversation_id", "fragment"), [
    ("x" * 257, "1 to 256 characters"),
    ("has space", "may only hold"),
    ("a/b", "may only hold"),
    ("<script>", "may only hold"),
])
def test_hardening_bad_conversation_ids_are_refused_by_the_router(start_router, tiny_model: Path,
                                                                  conversation_id: str, fragment: str) -> None:
    router = start_router(tiny_preset(tiny_model, ["a"]))
    body = {"model": "a", "prompt": "hi", "max_tokens": 2, "stream": True}
    answer = router.client.post("/v1/completions", json=body, headers={"X-Conversation-Id": conversation_id})
    assert answer.status_code == 400 and fragment in answer.json()["error"]["message"]
    assert router.status("a") == "unloaded"  # refused before any model was involved
    assert _conversations(router) == 0


def test_hardening_conversations_are_kept_only_when_the_child_accepted(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["a"]))
    refused = {"model": "a", "prompt": "hi", "max_tokens": 99_999, "stream": True}
    for i in range(20):
        answer = router.client.post("/v1/completions", json=refused, headers={"X-Conversation-Id": f"c{i}"})
        assert answer.status_code == 400
    assert _conversations(router) == 0
    accepted = {"model": "a", "prompt": "hi", "max_tokens": 2, "stream": True}
    with router.client.stream("POST", "/v1/completions", json=accepted, headers={"X-Conversation-Id": "ok-1"}) as r:
        assert r.status_code == 200
        r.read()
    assert _conversations(router) == 1


def test_hardening_conversation_map_is_bounded_in_bytes() -> None:
    from router.conversations import ENTRY_OVERHEAD_BYTES, ConversationMap

    conversations = ConversationMap(max_entries=1_000_000, max_bytes=100 * (256 + 1 + ENTRY_OVERHEAD_BYTES))
    for i in range(10_000):
        conversations.remember(f"{i:0256d}", "m")
    assert len(conversations) == 100 and conversations.bytes <= conversations.max_bytes
    assert conversations.owner(f"{9_999:0256d}") == "m" and conversations.owner(f"{0:0256d}") is None


# -- 6. a reload while a load waits for room -------------------------------------------------------

def test_hardening_a_model_removed_while_its_load_waits_is_never_spawned(start_router, tiny_model: Path) -> None:
    busy = _fake("busy", "--tokens", "150", "--token-delay", "0.02")
    router = start_router(busy + tiny_preset(tiny_model, ["b"]).split("\n\n", 1)[1], "--models-max", "1")
    with waiting_for_room(router, "busy", "b") as waiting:
        router.preset_path.write_text(busy)  # b is gone from the sources
        assert [m["id"] for m in router.client.get("/models", params={"reload": "1"}).json()["data"]] == ["busy"]
    answer = waiting.result(60)
    assert answer.status_code == 400 and "removed while it waited" in answer.json()["error"]["message"]
    time.sleep(0.5)  # a child started by mistake would be up by now
    assert not any("--alias" in p.cmdline() and "b" in p.cmdline() for p in router.children())
    assert "[b] started child pid" not in router.log_text()


# -- 7. load-timeout applies to every kind of child ------------------------------------------------

def test_hardening_a_protocol_child_that_never_gets_ready_is_killed_at_load_timeout(start_router) -> None:
    router = start_router(_fake("stuck", "--load-delay", "60", extra="load-timeout = 1"))
    began = time.monotonic()
    answer = router.client.post("/v1/chat/completions", json={"model": "stuck", "messages": []})
    assert answer.status_code == 500
    assert answer.json()["error"]["message"] == "model 'stuck' failed to load (exit code -9)"
    assert time.monotonic() - began < 30  # not the child's 60 s
    entry = router.model_entry("stuck")
    assert entry["status"]["value"] == "unloaded" and entry["status"]["failed"] is True
    assert "[stuck] not ready within 1 s (load-timeout): killing it" in router.log_text()


# -- 8. whatever goes wrong while spawning settles the record ---------------------------------------

def _registry_with_fake_child():  # type: ignore[no-untyped-def]
    from router.events import EventHub
    from router.model_sources import ModelSpec
    from router.registry import Registry
    from router.settings import RouterSettings
    from router.upstream_client import UpstreamClient

    spec = ModelSpec(name="f", source="preset", options={"model": "/unused.gguf"},
                     foreign_bin=tuple(fake_bin().split()))
    return Registry(RouterSettings(), [spec], EventHub(), UpstreamClient(5.0, 30.0))


@pytest.mark.anyio
async def test_hardening_a_spawn_that_raises_leaves_the_model_unloaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever starting the child raises (not only an OSError), the record is settled as a failed
    load: it never stays `loading` with nobody to finish it, and the next request tries again."""
    from router.child_process import ChildProcess
    from router.errors import ServerError
    from router.model_status import ModelStatus

    async def broken_start(self: ChildProcess) -> None:
        raise RuntimeError("no way to start it")

    monkeypatch.setattr(ChildProcess, "start", broken_start)
    registry = _registry_with_fake_child()
    try:
        for _ in range(2):
            with pytest.raises(ServerError, match="cannot start the child: no way to start it"):
                await registry.acquire("f", autoload=True)
            record = registry.records["f"]
            assert record.status == ModelStatus.UNLOADED and record.exit_code == 127
            assert record.ready is not None and record.ready.done() and record.in_flight == 0
    finally:
        registry.kill_all_now()


@pytest.mark.anyio
async def test_hardening_a_cancelled_spawn_still_settles(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller of a load is cancelled (its client left) while the child is being started: the
    spawn runs to its end anyway, and the record never stays `loading` with nobody to finish it."""
    import asyncio

    from router.child_process import ChildProcess
    from router.model_status import ModelStatus

    started = asyncio.Event()
    real_start = ChildProcess.start

    async def slow_start(self: ChildProcess) -> None:
        started.set()
        await asyncio.sleep(0.3)  # the moment a cancellation can land in the middle of a spawn
        await real_start(self)

    monkeypatch.setattr(ChildProcess, "start", slow_start)
    registry = _registry_with_fake_child()
    try:
        acquiring = asyncio.create_task(registry.acquire("f", autoload=True))
        await asyncio.wait_for(started.wait(), 10)
        acquiring.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await acquiring
        record = registry.records["f"]
        for _ in range(200):
            if record.status != ModelStatus.LOADING:
                break
            await asyncio.sleep(0.05)
        assert record.status == ModelStatus.LOADED
        assert record.ready is not None and record.ready.done()
        assert record.in_flight == 0
    finally:
        await registry.shutdown()
        registry.kill_all_now()


# -- 9. a client that leaves a non-streamed request stops its work ------------------------------

def test_hardening_a_non_streamed_request_whose_client_left_is_cancelled(start_router) -> None:
    router = start_router(_fake("slow", "--answer-delay", "60"))
    router.client.post("/models/load", json={"model": "slow"})
    router.wait_status("slow", "loaded")
    for _ in range(3):
        with contextlib.suppress(httpx.TimeoutException):
            httpx.post(router.url + "/v1/chat/completions", json={"model": "slow", "messages": []}, timeout=0.5)
    # The router let go of the model at once, not after the child's 60 s.
    _wait(lambda: router.model_entry("slow")["in_flight"] == 0, 10, "the router kept the requests in flight")


def test_hardening_the_child_stops_a_generation_whose_client_left(start_child, smollm2_model: Path) -> None:
    child = start_child(smollm2_model, "-np", "3", "-c", "9600", "-t", "2")
    body = {"prompt": "Tell me a story.", "max_tokens": 3000, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        cut = [pool.submit(httpx.post, child.url + "/v1/completions", json=body, timeout=1.5) for _ in range(3)]
        for future in cut:
            with contextlib.suppress(httpx.TimeoutException):
                future.result(60)
    child.wait_metric("modelyard:slots_busy", 0, timeout_s=60)
    # 3 x 3000 tokens would take minutes here: the slots were freed when the clients left.
    assert child.metric("llamacpp:tokens_predicted_total") < 3 * 3000
    assert child.client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


# -- 10. nothing a child started outlives a killed router -------------------------------------------

def test_hardening_grandchildren_of_a_cmd_child_die_with_a_killed_router(start_router, tiny_model: Path) -> None:
    server = f"{sys.executable} -m child -m {tiny_model} --port $1 -c 512 -np 1 -t 1"
    command = f'sh -c "sleep 600 & {server}" sh ${{PORT}}'
    router = start_router(f"[shell]\ncmd = {command}\nload-on-startup = true\n")
    router.wait_status("shell", "loaded")
    family = router.children()
    assert any(p.name() == "sleep" for p in family), [p.cmdline() for p in family]
    os.kill(router.proc.pid, signal.SIGKILL)
    router.proc.wait(10)
    alive, _ = wait_dead(family, timeout_s=10)
    assert alive == [], f"outlived the router: {[p.cmdline() for p in alive]}"


# -- 11. the Hugging Face token stays with the router --------------------------------------------

def test_hardening_children_never_get_the_hugging_face_token(start_router, tiny_model: Path) -> None:
    preset = tiny_preset(tiny_model, ["own"]) + f"[other]\nmodel = /x.gguf\nbin = {fake_bin()}\n"
    router = start_router(preset, env={"HF_TOKEN": "hf_secret", "HUGGING_FACE_HUB_TOKEN": "hf_secret"})
    for name in ("own", "other"):
        assert router.client.post("/models/load", json={"model": name}).status_code == 200
        router.wait_status(name, "loaded")
        environment = router.child_of(name).environ()
        assert "HF_TOKEN" not in environment and "HUGGING_FACE_HUB_TOKEN" not in environment, name


# -- 2. the event loop answers while a model's header is read and while it loads ------------------

def test_hardening_health_answers_while_a_model_header_cannot_be_read(start_router, tmp_path: Path) -> None:
    # Admission reads the model's GGUF header; a FIFO blocks whoever opens it until a writer comes.
    # Read on the event loop, that froze the whole router; read in a worker thread, only this load
    # waits.
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    router = start_router(f"[piped]\nmodel = {fifo}\nbin = {fake_bin()}\n")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        loading = pool.submit(httpx.post, router.url + "/models/load", json={"model": "piped"}, timeout=60)
        time.sleep(0.5)  # the load is now stuck opening the FIFO
        for _ in range(5):
            assert httpx.get(router.url + "/health", timeout=5).json() == {"status": "ok"}
            assert httpx.get(router.url + "/models", timeout=5).status_code == 200
        with open(fifo, "wb"):  # a writer: the header read ends (with nothing to read)
            pass
        assert loading.result(60).status_code == 200
    router.wait_status("piped", "loaded")


def test_hardening_gguf_header_reader_skips_the_vocabulary(tiny_model: Path) -> None:
    from gguf import GGUFReader

    from router.gguf_header import read_metadata

    fields = read_metadata(tiny_model)
    reference = GGUFReader(str(tiny_model))
    for name, field in reference.fields.items():
        if name.startswith("tokenizer.") and not isinstance(field.contents(), str | int | float):
            assert name not in fields  # arrays of the vocabulary are stepped over, not decoded
        elif not name.startswith("GGUF."):
            assert fields[name] == field.contents(), name
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2


# -- found by the outside review of this change -----------------------------------------------------

def _raw_request(url: str) -> tuple[socket.socket, str]:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30), host


def _read_answer(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 100"):  # the router's own interim answer
        data = body
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = int(next(line.split(b":")[1] for line in lines if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head, body


def test_hardening_expect_100_continue_never_hands_an_answer_to_another_client(start_router) -> None:
    import json

    router = start_router(_fake("f", "--answer-delay", "1"))
    router.client.post("/models/load", json={"model": "f"})
    router.wait_status("f", "loaded")
    sock, _ = _raw_request(router.url)
    body = json.dumps({"model": "f", "messages": [], "tag": "alice"}).encode()
    with sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        time.sleep(0.3)
        bob = router.client.post("/v1/chat/completions", json={"model": "f", "messages": [], "tag": "bob"})
        head, alice = _read_answer(sock)
    assert head.startswith(b"HTTP/1.1 200") and json.loads(alice)["tag"] == "alice"
    assert json.loads(alice)["received_expect"] is None  # the router answered it; the child never saw it
    assert bob.json()["tag"] == "bob"


def test_hardening_chunk_trailers_count_toward_the_header_cap(start_router) -> None:
    router = start_router(_fake("f"), "--api-key", "k3y")
    sock, _ = _raw_request(router.url)
    batch = b"".join(b"X-Trailer: " + b"t" * 86 + b"\r\n" for _ in range(1000))  # 100 KB of trailer fields
    sent = 0
    with sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"2\r\n{}\r\n0\r\n")
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            while sent < 50_000_000:  # the router used to take all of it, and keep it
                sock.sendall(batch)
                sent += len(batch)
    # The router closed the connection long before: what it buffers per request stays bounded.
    assert sent < 20_000_000, f"the router accepted {sent} bytes of trailers"
    assert router.client.get("/health").status_code == 200


def test_hardening_a_pipelined_request_does_not_hide_a_disconnect(start_router) -> None:
    router = start_router(_fake("slow", "--answer-delay", "60"))
    router.client.post("/models/load", json={"model": "slow"})
    router.wait_status("slow", "loaded")
    sock, _ = _raw_request(router.url)
    body = b'{"model": "slow", "messages": []}'
    post = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    with sock:
        sock.sendall(post + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # the second one waits its turn
        _wait(lambda: router.model_entry("slow")["in_flight"] == 1, 10, "the request never reached the router")
    # The client is gone: the request it left running is cancelled, the queued one never runs.
    _wait(lambda: router.model_entry("slow")["in_flight"] == 0, 10, "the pipelined request hid the disconnect")


def test_hardening_a_stuck_header_read_delays_only_its_own_load(start_router, tmp_path: Path) -> None:
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    router = start_router(f"[piped]\nmodel = {fifo}\nbin = {fake_bin()}\n" + _fake("other"))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        stuck = pool.submit(httpx.post, router.url + "/models/load", json={"model": "piped"}, timeout=60)
        time.sleep(0.5)
        assert router.client.post("/models/load", json={"model": "other"}).status_code == 200
        router.wait_status("other", "loaded", timeout_s=15)  # not behind the FIFO
        assert router.status("piped") == "unloaded"
        with open(fifo, "wb"):
            pass
        assert stuck.result(60).status_code == 200


def test_hardening_a_truncated_gguf_has_no_estimate_and_breaks_nothing(start_router, tmp_path: Path) -> None:
    from router.memory import PROCESS_ALLOWANCE_BYTES, estimate_model_bytes

    cut = tmp_path / "cut.gguf"
    for header in (b"GGUF\x03\x00", b"GGUF\x03\x00\x00\x00" + b"\x00" * 8 + (10).to_bytes(8, "little")
                   + (2**62).to_bytes(8, "little")):
        cut.write_bytes(header)
        assert estimate_model_bytes(str(cut), 2048) == len(header) + PROCESS_ALLOWANCE_BYTES
    router = start_router(f"[cut]\nmodel = {cut}\nbin = {fake_bin()}\n")
    assert router.client.post("/models/load", json={"model": "cut"}).status_code == 200
    router.wait_status("cut", "loaded")


def test_hardening_a_model_changed_while_its_load_waits_loads_as_changed(start_router, tmp_path: Path) -> None:
    busy = _fake("busy", "--tokens", "150", "--token-delay", "0.02")
    router = start_router(busy + "[b]\nmodel = /unused/b-OLD.gguf\nbin = " + fake_bin() + "\n", "--models-max", "1")
    with waiting_for_room(router, "busy", "b") as waiting:
        router.preset_path.write_text(busy + "[b]\nmodel = /unused/b-NEW.gguf\nbin = " + fake_bin() + "\n")
        router.client.get("/models", params={"reload": "1"})
    assert waiting.result(60).status_code == 200
    args = router.model_entry("b")["status"]["args"]
    assert "/unused/b-NEW.gguf" in args and "/unused/b-OLD.gguf" not in args


def test_hardening_a_reload_lets_requests_in_flight_finish(start_router) -> None:
    router = start_router(_fake("going", "--tokens", "60", "--token-delay", "0.02"))
    preset = router.preset_path
    body = {"model": "going", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    with router.client.stream("POST", "/v1/chat/completions", json=body) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        preset.write_text(_fake("other"))
        assert [m["id"] for m in router.client.get("/models", params={"reload": "1"}).json()["data"]] == ["other"]
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]" and len(rest) == 60  # the 59 other tokens and [DONE]: all of it
    _wait(lambda: "[going] child pid" in router.log_text() and "exited with code 0" in router.log_text(), 15,
          "the removed model kept running")


def test_hardening_gguf_header_reader_keeps_no_huge_array(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    from router.gguf_header import MAX_KEPT_ARRAY, read_metadata

    path = tmp_path / "arrays.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_array("llama.per_layer", [1, 2])
    writer.add_array("llama.table", list(range(MAX_KEPT_ARRAY + 1)))  # a file from anywhere may hold this
    writer.add_tensor("t", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    fields = read_metadata(path)
    assert fields["llama.per_layer"] == [1, 2] and fields["llama.block_count"] == 2
    assert "llama.table" not in fields
