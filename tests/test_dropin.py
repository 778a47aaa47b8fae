"""What users of llama.cpp's router and llama-swap already rely on: every route reaches its model
(by the body, a form field or ?model=), llama-swap's /upstream, per-model env, concurrency limits,
unlisted models, and a packaged default preset."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from conftest import RouterProcess, fake_bin, tiny_preset

REPOSITORY = Path(__file__).resolve().parent.parent


def test_any_post_reaches_the_model_its_body_form_or_query_names(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny"]) + f"[fake]\nmodel = {tiny_model}\nbin = {fake_bin()}\n")
    client = router.client
    # A route the router has no name for (a llama-server route with a slot id in its path).
    answer = client.post("/slots/0?action=save", json={"model": "fake", "filename": "x.bin"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["path"] == "/slots/0?action=save"
    # ?model= names it when the body does not (POST /props, /lora-adapters take no model field).
    answer = client.post("/lora-adapters?model=fake", json=[{"id": 0, "scale": 0.5}])
    assert answer.status_code == 200 and answer.json()["path"] == "/lora-adapters?model=fake"
    # A multipart form's `model` field (OpenAI's /v1/audio/transcriptions); the body goes as it came.
    files = {"file": ("a.wav", b"RIFF" + b"\0" * 4000, "audio/wav")}
    answer = client.post("/v1/audio/transcriptions", data={"model": "fake", "language": "en"}, files=files)
    assert answer.status_code == 200, answer.text
    echoed = answer.json()
    assert echoed["path"] == "/v1/audio/transcriptions" and echoed["content_type"].startswith("multipart/form-data")
    assert echoed["bytes"] > 4000
    # A body without a model, on one of the routes the router knows: ?model= names it.
    tokens = client.post("/tokenize?model=tiny", json={"content": "hello"})
    assert tokens.status_code == 200 and tokens.json()["tokens"]
    # Nothing names a model: the router's 404, in the OpenAI shape.
    for body in ({"filename": "x"}, None):
        answer = client.post("/slots/0?action=save", json=body)
        assert answer.status_code == 404 and answer.json()["error"]["type"] == "not_found_error"
    answer = client.post("/v1/audio/transcriptions", files=files)
    assert answer.status_code == 404
    # A file where the model's name should be.
    answer = client.post("/v1/audio/transcriptions", files={"model": ("m", b"fake", "text/plain"), **files})
    assert answer.status_code == 400 and "'model'" in answer.json()["error"]["message"]
    # An unknown model named in a form: the same 400 as in a JSON body.
    answer = client.post("/v1/audio/transcriptions", data={"model": "nope"}, files=files)
    assert answer.status_code == 400 and "nope" in answer.json()["error"]["message"]


def test_upstream_reaches_a_models_own_routes_under_any_method(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny"]) + f"[fake]\nmodel = {tiny_model}\nbin = {fake_bin()}\n")
    client = router.client
    page = client.get("/upstream/fake/some/page.js?v=2")
    assert page.status_code == 200, page.text
    assert page.json() == {"path": "/some/page.js?v=2", "model": "fake"}
    assert client.get("/upstream/fake").json()["path"] == "/"
    assert client.get("/upstream/fake?x=1").json()["path"] == "/?x=1"
    # Encoded characters stay encoded: no `?` or line break is smuggled into the child's request.
    assert client.get("/upstream/fake/a%3Fb%20c").json()["path"] == "/a%3Fb%20c"
    smuggled = client.get("/upstream/fake/a%0D%0AX-Evil:%201")
    assert smuggled.status_code == 404 and "path" not in smuggled.json()
    assert client.delete("/upstream/fake/slots/1").json() == {"path": "/slots/1", "model": "fake", "method": "DELETE"}
    # The real child: its own /props and /health, the model loaded on the way.
    props = client.get("/upstream/tiny/props")
    assert props.status_code == 200 and props.json()["model_alias"] == "tiny"
    assert router.status("tiny") == "loaded"
    missing = client.get("/upstream/nope/props")
    assert missing.status_code == 400 and "nope" in missing.json()["error"]["message"]


def test_preset_env_reaches_the_child_over_the_routers_own(start_router, tiny_model: Path) -> None:
    preset = tiny_preset(tiny_model, ["tiny"], extra="env = MODELYARD_TEST_B=two, MODELYARD_TEST_LIST=a,b,c\n")
    preset = preset.replace("[*]\n", "[*]\nenv = MODELYARD_TEST_A=one, MODELYARD_TEST_B=global\n")
    router = start_router(preset, env={"MODELYARD_TEST_A": "from-router", "MODELYARD_TEST_C": "kept"})
    router.client.post("/models/load", json={"model": "tiny"})
    router.wait_status("tiny", "loaded")
    environ = router.child_of("tiny").environ()
    assert environ["MODELYARD_TEST_A"] == "one"  # the preset's [*] over the router's environment
    assert environ["MODELYARD_TEST_B"] == "two"  # the section over [*]
    assert environ["MODELYARD_TEST_LIST"] == "a,b,c"  # a comma not followed by NAME= is in the value
    assert environ["MODELYARD_TEST_C"] == "kept"


def test_preset_env_errors_name_the_line(start_router, tiny_model: Path) -> None:
    for bad, message in (("env = NOT A NAME=1", "expected NAME=value"),
                         ("env = LLAMA_SERVER_ROUTER_PORT=1", "set by the router itself"),
                         ("concurrency-limit = many", "whole number"), ("unlisted = maybe", "true or false")):
        with pytest.raises(RuntimeError, match=message):
            start_router(tiny_preset(tiny_model, ["tiny"], extra=bad + "\n"))


def test_concurrency_limit_answers_429_beyond_it(start_router, tiny_model: Path) -> None:
    preset = tiny_preset(tiny_model, ["tiny"]) + \
        f"[slow]\nmodel = {tiny_model}\nbin = {fake_bin('--answer-delay', '3')}\nconcurrency-limit = 1\n"
    router = start_router(preset)
    router.client.post("/models/load", json={"model": "slow"})
    router.wait_status("slow", "loaded")
    body = {"model": "slow", "messages": [{"role": "user", "content": "hi"}]}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(router.client.post, "/v1/chat/completions", json=body)
        deadline = time.monotonic() + 10
        while router.model_entry("slow")["in_flight"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = router.client.post("/v1/chat/completions", json=body)
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1"
        assert "concurrency-limit" in refused.json()["error"]["message"]
        assert first.result().status_code == 200
    assert router.client.post("/v1/chat/completions", json=body).status_code == 200  # room again
    # Models without a limit take any number.
    assert router.model_entry("tiny")["status"]["value"] == "unloaded"


def test_unlisted_models_are_served_but_not_listed(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["shown"]) + f"[hidden]\nmodel = {tiny_model}\nunlisted = true\n")
    assert [m["id"] for m in router.client.get("/v1/models").json()["data"]] == ["shown"]
    answer = router.client.post("/v1/completions", json={"model": "hidden", "prompt": "hi", "max_tokens": 2})
    assert answer.status_code == 200, answer.text
    assert router.client.get("/running").json()["running"][0]["model"] == "hidden"


def test_preset_star_and_named_sections_apply_to_models_dir_models(start_router, tiny_model: Path,
                                                                   tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_model, models / "alpha.gguf")
    shutil.copy(tiny_model, models / "beta.gguf")
    # [alpha] names a models-dir model without a file of its own: it adds settings to it.
    preset = "version = 1\n[*]\nc = 1024\nt = 1\nttl = 300\n[alpha]\nc = 512\nalias = first\n"
    router = start_router(preset, "--models-dir", str(models))
    entries = {m["id"]: m for m in router.client.get("/v1/models").json()["data"]}
    assert set(entries) == {"alpha", "beta"}
    assert entries["alpha"]["aliases"] == ["first"] and entries["alpha"]["source"] == "models_dir"
    args = {name: entry["status"]["args"] for name, entry in entries.items()}
    assert args["alpha"][args["alpha"].index("--ctx-size") + 1] == "512"
    assert args["beta"][args["beta"].index("--ctx-size") + 1] == "1024"
    assert str(models / "alpha.gguf") in args["alpha"]
    answer = router.client.post("/v1/completions", json={"model": "first", "prompt": "hi", "max_tokens": 2})
    assert answer.status_code == 200, answer.text
    assert {e["model"]: e["ttl"] for e in router.client.get("/running").json()["running"]} == {"alpha": 300}


def test_pip_install_without_make_serves_the_packaged_default_preset(tmp_path: Path) -> None:
    """`pip install .` alone: a bare `modelyard` serves the default preset from inside the package."""
    source = tmp_path / "source"  # a copy: pip builds in the tree it is given
    for part in ("router", "child", "presets"):
        shutil.copytree(REPOSITORY / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(REPOSITORY / part, source / part)
    site = tmp_path / "site"
    built = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                            str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    assert (site / "router" / "default_presets" / "default.ini").is_file()
    elsewhere = tmp_path / "elsewhere"  # not the repository: `router` comes from the installed copy
    elsewhere.mkdir()
    router = RouterProcess([], env={"PYTHONPATH": str(site)}, hf_cache=tmp_path / "hf", cwd=elsewhere)
    try:
        assert f"preset {site / 'router' / 'default_presets' / 'default.ini'}" in router.log_text()
        names = {m["id"] for m in router.client.get("/v1/models").json()["data"]}
        assert {"smollm2", "gemma3-270m"} <= names
        router.wait_status("smollm2", "loaded", timeout_s=120)  # load-on-startup in the default preset
        child = router.child_of("smollm2")  # imports the installed `child` too
        assert child.cwd() == str(elsewhere) and child.environ()["PYTHONPATH"] == str(site)
        answer = router.client.post("/v1/chat/completions", json={
            "model": "chat", "max_tokens": 24, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]},
            timeout=120)
        assert answer.status_code == 200 and "Paris" in answer.json()["choices"][0]["message"]["content"]
    finally:
        router.stop()


@contextlib.contextmanager
def _busy_stream(router: RouterProcess) -> Iterator[Callable[[], None]]:
    """The fake `busy` model streams in the only place (--models-max 1); yields a function that
    waits until a load is waiting for room. Busy's stream ends when the block does."""
    body = {"model": "busy", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    with router.client.stream("POST", "/v1/chat/completions", json=body) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data: "))

        def wait_for_room_wait() -> None:
            deadline = time.monotonic() + 30
            while "load of tiny waits for room" not in router.log_text():
                assert time.monotonic() < deadline, "tiny never waited for room"
                time.sleep(0.02)

        yield wait_for_room_wait
        assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"


def _conversation_preset(tiny_model: Path) -> str:
    return tiny_preset(tiny_model, ["tiny"]) + \
        f"[busy]\nmodel = {tiny_model}\nbin = {fake_bin('--tokens', '40', '--token-delay', '0.05')}\n"


CONVERSATION_CHAT = {"model": "tiny", "stream": True, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                     "messages": [{"role": "user", "content": "hello"}]}


def test_a_streamed_conversation_waiting_for_its_model_survives_its_client(start_router, tiny_model: Path) -> None:
    router = start_router(_conversation_preset(tiny_model), "--models-max", "1")
    host, port = router.url.removeprefix("http://").split(":")
    body = json.dumps(CONVERSATION_CHAT).encode()
    with _busy_stream(router) as wait_for_room_wait, socket.create_connection((host, int(port))) as client:
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"X-Conversation-Id: left-early\r\nContent-Length: " + str(len(body)).encode()
                       + b"\r\n\r\n" + body)
        wait_for_room_wait()
        # The client is gone; the conversation is known, its model loading after busy.
    router.wait_status("tiny", "loaded")
    deadline = time.monotonic() + 30
    while True:
        replay = router.client.get("/v1/stream", params={"conv_id": "left-early"})
        if replay.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert replay.status_code == 200, replay.text
    events = [line for line in replay.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["timings"]["predicted_n"] == 8  # the whole generation, run for nobody


def test_deleting_a_conversation_cancels_its_request_waiting_for_the_model(start_router, tiny_model: Path) -> None:
    router = start_router(_conversation_preset(tiny_model), "--models-max", "1")
    with _busy_stream(router) as wait_for_room_wait, concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(httpx.post, router.url + "/v1/chat/completions", json=CONVERSATION_CHAT,
                              headers={"X-Conversation-Id": "given-up"}, timeout=60)
        wait_for_room_wait()
        assert router.client.delete("/v1/stream", params={"conv_id": "given-up"}).status_code == 204
        answer = waiting.result()
        assert answer.status_code == 409 and "deleted" in answer.json()["error"]["message"]
    time.sleep(1.0)  # busy's stream is over: nothing is waiting for room any more
    assert router.status("tiny") == "unloaded"


# -- findings of the review of this work, each a test ---------------------------------------------

def test_options_needs_the_key_and_upstream_takes_no_head_or_options(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny"]) + f"[fake]\nmodel = {tiny_model}\nbin = {fake_bin()}\n",
                          "--api-key", "sekrit")
    assert router.client.options("/upstream/fake/health").status_code == 401
    assert router.client.options("/v1/chat/completions").status_code == 401
    keyed = {"Authorization": "Bearer sekrit"}
    models = router.client.get("/v1/models", headers=keyed).json()["data"]
    assert {m["id"]: m["status"]["value"] for m in models}["fake"] == "unloaded"  # nothing loaded without the key
    assert router.client.head("/upstream/fake/health", headers=keyed).status_code == 405
    assert router.client.get("/upstream/fake/health", headers=keyed).json() == {"status": "ok"}


def test_upstream_reaches_models_whose_name_holds_a_slash(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny"]) +
                          f"[org/fake]\nmodel = {tiny_model}\nbin = {fake_bin()}\n")
    for url in ("/upstream/org/fake/v1/models", "/upstream/org%2Ffake/v1/models"):
        answer = router.client.get(url)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"path": "/v1/models", "model": "org/fake"}
    assert router.client.get("/upstream/org/v1/models").status_code == 400


def _slow_preset(smollm2_model: Path) -> str:
    """SmolLM2 with one slot: a long generation takes seconds, whatever the machine."""
    return f"version = 1\n[tiny]\nmodel = {smollm2_model}\nc = 2048\nnp = 1\nt = 1\nconcurrency-limit = 1\n"


def test_stream_routes_are_outside_the_concurrency_limit(start_router, smollm2_model: Path) -> None:
    router = start_router(_slow_preset(smollm2_model))
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 1800, "ignore_eos": True, "stream": True}
    with router.client.stream("POST", "/v1/completions", json=body, headers={"X-Conversation-Id": "held"}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: an iterator dropped after one line closes the connection
        next(lines)
        found = router.client.post("/v1/streams/lookup", json={"conversation_ids": ["held"]})
        assert found.status_code == 200 and found.json()[0]["conversation_id"] == "held"
        assert router.client.post("/v1/completions", json={**body, "stream": False}).status_code == 429
        assert router.client.delete("/v1/stream", params={"conv_id": "held"}).status_code == 204


def test_an_abandoned_resumable_stream_keeps_its_model_until_it_ends(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["a", "b"], np=1), "--models-max", "1")
    body = {"model": "a", "prompt": "hi", "max_tokens": 1800, "ignore_eos": True, "stream": True,
            "temperature": 0}
    with router.client.stream("POST", "/v1/completions", json=body, headers={"X-Conversation-Id": "gone"}) as r:
        next(r.iter_lines())
    # Its client left; the stream goes on. b's load has to wait for it instead of evicting a.
    answer = router.client.post("/v1/completions", json={"model": "b", "prompt": "hi", "max_tokens": 2})
    assert answer.status_code == 200
    assert "load of b waits for room" in router.log_text()


def test_native_completion_refuses_more_prompts_than_the_model_takes(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny"]))
    many = router.client.post("/completion", json={"model": "tiny", "n_predict": 1, "prompt": ["a"] * 5000})
    assert many.status_code == 400 and "--max-queue" in many.json()["error"]["message"]
    odd = router.client.post("/completion", json={"model": "tiny", "prompt": "hi", "logit_bias": {"²": 1}})
    assert odd.status_code == 200, odd.text  # a text to bias, not a token id


def test_lookup_survives_a_child_that_answers_anything(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny"]) + f"[fake]\nmodel = {tiny_model}\nbin = {fake_bin()}\n")
    chat = {"model": "fake", "messages": [{"role": "user", "content": "x"}]}
    assert router.client.post("/v1/chat/completions", json=chat, headers={"X-Conversation-Id": "f1"}).status_code == 200
    found = router.client.post("/v1/streams/lookup", json={"conversation_ids": ["f1"]})
    assert found.status_code == 200 and found.json() == []  # the fake child answers a chat completion
    broken = router.client.post("/v1/audio/transcriptions", content=b"--x\r\n",
                                headers={"content-type": "multipart/form-data"})
    assert broken.status_code == 400 and broken.json()["error"]["type"] == "invalid_request_error"


def test_a_failed_request_does_not_undo_a_later_one_of_the_same_conversation() -> None:
    from router.conversations import ConversationMap

    conversations = ConversationMap()
    first = conversations.remember("c", "a")  # a request that will fail
    conversations.remember("c", "b")  # a second one, accepted meanwhile
    conversations.restore("c", None, first)
    assert conversations.owner("c") == "b"
    third = conversations.remember("c", "a")
    conversations.restore("c", "b", third)  # refused: back to what it was
    assert conversations.owner("c") == "b"


def test_abandoned_requests_of_one_conversation_hold_their_model_once(start_router, smollm2_model: Path) -> None:
    router = start_router(_slow_preset(smollm2_model))
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 1800, "ignore_eos": True, "stream": True}
    held = "stream r goes on for a client that left"
    for _ in range(2):  # the second replaces the first in the child
        with router.client.stream("POST", "/v1/completions", json=body, headers={"X-Conversation-Id": "r"}) as r:
            assert r.status_code == 200
            next(r.iter_lines())
        # Until the router notices the client left, the relay's lease still counts against the
        # limit of 1 (a second request then is rightly refused with 429): wait for the hand-over.
        deadline = time.monotonic() + 10
        while held not in router.log_text() or router.model_entry("tiny")["in_flight"] != 1:
            assert time.monotonic() < deadline, router.model_entry("tiny")  # the relay's lease goes, one hold stays
            time.sleep(0.05)
    assert router.log_text().count(held) == 1
    # The hold is work already admitted: a new request is not over the limit because of it (it
    # waits for the one slot; the DELETE frees it).
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(router.client.post, "/v1/completions",
                              json={**body, "stream": False, "max_tokens": 2})
        time.sleep(0.5)
        assert router.client.delete("/v1/stream", params={"conv_id": "r"}).status_code == 204
        answer = waiting.result()
    assert answer.status_code == 200, answer.text + "\n" + "\n".join(router.lines[-30:])


def test_stream_routes_read_a_childs_streamed_answer_whole(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny"]) +
                          f"[sse]\nmodel = {tiny_model}\nbin = {fake_bin('--always-stream', '--tokens', '3')}\n")
    chat = {"model": "sse", "messages": [{"role": "user", "content": "x"}]}
    assert router.client.post("/v1/chat/completions", json=chat, headers={"X-Conversation-Id": "s1"}).status_code == 200
    found = router.client.post("/v1/streams/lookup", json={"conversation_ids": ["s1"]})
    assert found.status_code == 200 and found.json() == []
    assert router.client.delete("/v1/stream", params={"conv_id": "s1"}).status_code == 204
    assert router.model_entry("sse")["in_flight"] == 0  # no lease left behind by either
