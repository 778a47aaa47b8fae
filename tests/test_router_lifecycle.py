"""Child lifecycle through the router: LRU, crashes, stop timeouts, and no orphans ever."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time
from pathlib import Path

import httpx
import psutil

from conftest import EventFeed, fake_bin, tiny_preset, wait_dead

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0,
        "ignore_eos": True}


def _chat(router, model: str) -> httpx.Response:
    return router.client.post("/v1/chat/completions", json={"model": model, **CHAT})


def _fake_preset(name: str, *flags: str, extra: str = "") -> str:
    return f"[{name}]\nmodel = /unused/{name}.gguf\nbin = {fake_bin(*flags)}\n{extra}\n"


def test_router_models_max_1_swaps_models(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["a", "b"]), "--models-max", "1")
    assert _chat(router, "a").status_code == 200
    assert _chat(router, "b").status_code == 200
    assert router.status("a") == "unloaded" and router.status("b") == "loaded"
    assert "evicting a (least recently used, --models-max) to make room for b" in router.log_text()
    assert len(router.children()) == 1


def test_router_models_max_2_evicts_the_least_recently_used(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["a", "b", "c"]), "--models-max", "2")
    for name in ("a", "b", "a"):  # b is now the least recently used
        assert _chat(router, name).status_code == 200
    assert _chat(router, "c").status_code == 200
    assert [router.status(n) for n in ("a", "b", "c")] == ["loaded", "unloaded", "loaded"]
    assert len(router.children()) == 2


def test_router_never_evicts_a_model_in_the_middle_of_a_request(start_router, tiny_model: Path) -> None:
    preset = tiny_preset(tiny_model, ["b"]) + _fake_preset("slow", "--tokens", "40", "--token-delay", "0.02")
    router = start_router(preset, "--models-max", "1")
    body = {"model": "slow", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    with router.client.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert "t0" in first
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            other = pool.submit(lambda: httpx.post(router.url + "/v1/chat/completions",
                                                   json={"model": "b", **CHAT}, timeout=60))
            rest = [line for line in lines if line.startswith("data: ")]
            # The whole stream arrived although another model wanted the only place.
            assert rest[-1] == "data: [DONE]" and len(rest) == 40
            assert other.result(60).status_code == 200
    assert router.status("slow") == "unloaded" and router.status("b") == "loaded"


def test_router_child_killed_mid_stream_ends_the_stream_with_an_error(start_router, tiny_model: Path) -> None:
    preset = _fake_preset("fake", "--tokens", "2000", "--token-delay", "0.005")
    router = start_router(preset)
    body = {"model": "fake", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    with router.client.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        router.child_of("fake").send_signal(signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest, "the stream ended without telling the client"
    error = json.loads(rest[-1][6:])["error"]
    assert error["code"] == 502 and "stopped in the middle of the stream" in error["message"]
    entry = router.wait_status("fake", "unloaded")
    assert entry["status"]["failed"] is True and entry["status"]["exit_code"] == -signal.SIGKILL
    # The next request respawns the model.
    again = router.client.post("/v1/chat/completions", json={"model": "fake", "messages": []})
    assert again.status_code == 200 and router.status("fake") == "loaded"


def test_router_real_child_killed_mid_stream(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny"], np=1))
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 1900, "ignore_eos": True, "stream": True}
    with router.client.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        router.child_of("tiny").send_signal(signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data: ")]
    assert "data: [DONE]" not in rest
    assert json.loads(rest[-1][6:])["error"]["code"] == 502
    router.wait_status("tiny", "unloaded")
    assert router.client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}
                              ).status_code == 200


def test_router_non_streaming_request_to_a_crashing_child_gets_502(start_router) -> None:
    # The child crashes 0.5 s after it is ready, in the middle of a 30 s answer.
    router = start_router(_fake_preset("fake", "--crash-after", "0.5", "--answer-delay", "30"))
    assert router.client.post("/models/load", json={"model": "fake"}).status_code == 200
    router.wait_status("fake", "loaded")
    answer = router.client.post("/v1/chat/completions", json={"model": "fake", "messages": []})
    assert answer.status_code == 502
    error = answer.json()["error"]
    assert error["code"] == 502 and error["type"] == "server_error"
    assert error["message"].startswith("model 'fake' did not answer")
    entry = router.wait_status("fake", "unloaded")
    assert entry["status"]["exit_code"] == 3 and entry["status"]["failed"] is True


def test_router_load_failure_answers_500_naming_model_and_exit_code(start_router) -> None:
    router = start_router(_fake_preset("broken", "--fail-load", "--load-delay", "0.2"))
    feed = EventFeed(router.url)
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: httpx.post(
                router.url + "/v1/chat/completions", json={"model": "broken", "messages": []}, timeout=60),
                range(3)))
        for answer in answers:
            assert answer.status_code == 500
            assert answer.json()["error"]["message"] == "model 'broken' failed to load (exit code 1)"
        feed.wait_for(lambda e: e["data"].get("status") == "unloaded" and e["data"].get("exit_code") == 1)
        assert len([e for e in feed.seen if e["event"] == "model_status"]) == 1
    finally:
        feed.close()


def test_router_stop_timeout_escalates_to_sigkill(start_router) -> None:
    router = start_router(_fake_preset("stubborn", "--ignore-exit", extra="stop-timeout = 1"))
    router.client.post("/models/load", json={"model": "stubborn"})
    router.wait_status("stubborn", "loaded")
    child = router.child_of("stubborn")
    started = time.monotonic()
    assert router.client.post("/models/unload", json={"model": "stubborn"}).json() == {"success": True}
    assert time.monotonic() - started >= 1.0  # it was given its stop timeout first
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    entry = router.wait_status("stubborn", "unloaded")
    assert entry["status"]["exit_code"] == -signal.SIGKILL
    assert "still alive 1.0 s after the exit command: killing it" in router.log_text()


def test_router_unload_of_a_loading_model_kills_it_at_once(start_router) -> None:
    router = start_router(_fake_preset("slowload", "--load-delay", "30", extra="stop-timeout = 20"))
    router.client.post("/models/load", json={"model": "slowload"})
    assert router.status("slowload") == "loading"
    started = time.monotonic()
    router.client.post("/models/unload", json={"model": "slowload"})
    router.wait_status("slowload", "unloaded")
    assert time.monotonic() - started < 15  # not the 20 s stop timeout: killed, not asked


def test_router_ignores_garbage_on_child_stdout(start_router) -> None:
    router = start_router(_fake_preset("noisy", "--garbage"))
    response = router.client.post("/v1/chat/completions", json={"model": "noisy", "messages": []})
    assert response.status_code == 200
    log = router.log_text()
    assert "malformed protocol line ignored" in log and "[noisy] some log line on stdout" in log


def test_router_sigkill_leaves_no_child_alive(start_router, tiny_model: Path) -> None:
    preset = tiny_preset(tiny_model, ["a", "b"], extra="load-on-startup = true\n")
    preset += _fake_preset("f", "--load-delay", "60", extra="load-on-startup = true")
    router = start_router(preset)
    router.wait_status("a", "loaded")
    router.wait_status("b", "loaded")
    assert router.status("f") == "loading"
    children = router.children()
    assert len(children) >= 3
    os.kill(router.proc.pid, signal.SIGKILL)
    router.proc.wait(10)
    alive, _ = wait_dead(children, timeout_s=2)
    assert alive == [], f"orphans after the router died: {alive}"


def test_router_sigterm_stops_children_cleanly(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["a"], extra="load-on-startup = true\n"))
    router.wait_status("a", "loaded")
    child = router.child_of("a")
    router.proc.send_signal(signal.SIGTERM)
    # uvicorn re-raises the signal after its graceful shutdown, so the status is -SIGTERM.
    assert router.proc.wait(30) in (0, -signal.SIGTERM)
    assert not child.is_running()
    # The child got the exit command and left with 0 (psutil cannot read a non-child's status).
    assert f"child pid {child.pid} exited with code 0" in router.log_text()
