"""Model management: queueing for room, idle unload, pins, memory-aware admission, startup fit."""

from __future__ import annotations

import concurrent.futures
import contextlib
import subprocess
import sys
import time
from pathlib import Path

import httpx

from conftest import EventFeed, fake_bin, tiny_preset, waiting_for_room

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0,
        "ignore_eos": True}


def _slow_fake(name: str, tokens: int = 100) -> str:
    command = fake_bin("--tokens", str(tokens), "--token-delay", "0.02")
    return f"[{name}]\nmodel = /unused/{name}.gguf\nbin = {command}\n"


def _queue_length(router) -> float:  # type: ignore[no-untyped-def]
    for line in router.client.get("/metrics").text.splitlines():
        if line.startswith("modelyard_router_queue_length "):
            return float(line.split()[1])
    raise AssertionError("no queue length metric")


def _wait_log(router, text: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in router.log_text():
        assert time.monotonic() < deadline, f"log never said: {text}"
        time.sleep(0.02)


def test_management_waiters_for_one_model_share_one_load(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["b"]) + _slow_fake("busy"), "--models-max", "1")
    body = {"model": "busy", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    feed = EventFeed(router.url)
    try:
        with router.client.stream("POST", "/v1/chat/completions", json=body) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                # Three requests for b wait for the only place, held by a busy model.
                waiting = [pool.submit(httpx.post, router.url + "/v1/chat/completions",
                                       json={"model": "b", **CHAT}, timeout=60) for _ in range(3)]
                assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"
                assert [w.result(60).status_code for w in waiting] == [200, 200, 200]
        feed.wait_for(lambda e: e["model"] == "b" and e["data"].get("status") == "loaded")
    finally:
        feed.close()
    assert len([e for e in feed.seen if e["event"] == "model_status" and e["model"] == "b"]) == 1


def test_management_models_queue_refuses_with_503_and_retry_after(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["b", "c"]) + _slow_fake("busy", tokens=150), "--models-max", "1",
                          "--models-queue", "1")
    with waiting_for_room(router, "busy", "b") as queued:
        refused = httpx.post(router.url + "/v1/chat/completions", json={"model": "c", **CHAT}, timeout=60)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert "--models-queue" in refused.json()["error"]["message"]
    assert queued.result(60).status_code == 200


def test_management_client_leaving_the_queue_costs_nothing(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["b"]) + _slow_fake("busy"), "--models-max", "1")
    body = {"model": "busy", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    with router.client.stream("POST", "/v1/chat/completions", json=body) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        with contextlib.suppress(httpx.TimeoutException):  # the client gives up while waiting for room
            httpx.post(router.url + "/v1/chat/completions", json={"model": "b", **CHAT}, timeout=0.3)
        # The router noticed at once: the queue is empty again while busy is still streaming.
        deadline = time.monotonic() + 10
        while _queue_length(router) != 0:
            assert time.monotonic() < deadline, "the abandoned load stayed in the queue"
            time.sleep(0.02)
        assert router.status("busy") == "loaded" and router.model_entry("busy")["in_flight"] == 1
        assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"
    # The abandoned request neither loaded b nor left anything behind: busy stays resident.
    assert router.status("busy") == "loaded"
    assert router.status("b") == "unloaded"
    assert router.client.post("/v1/chat/completions", json={"model": "b", **CHAT}).status_code == 200


def test_management_idle_models_are_unloaded_after_their_ttl(start_router, tiny_model: Path) -> None:
    preset = tiny_preset(tiny_model, ["short"], extra="ttl = 0.5\n") + f"[long]\nmodel = {tiny_model}\n"
    router = start_router(preset, "--models-ttl", "300")
    feed = EventFeed(router.url)
    try:
        for name in ("short", "long"):
            assert router.client.post("/v1/chat/completions", json={"model": name, **CHAT}).status_code == 200
        event = feed.wait_for(lambda e: e["model"] == "short" and "exit_code" in e["data"])
        assert event["data"]["exit_code"] == 0
        assert router.status("long") == "loaded"
        assert "model short idle for" in router.log_text()
    finally:
        feed.close()


def test_management_stop_idle_seconds_is_llama_cpp_name_for_the_ttl(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["idle"]), "--stop-idle-seconds", "0.5")
    assert router.client.post("/v1/chat/completions", json={"model": "idle", **CHAT}).status_code == 200
    router.wait_status("idle", "unloaded", timeout_s=30)
    assert "model idle idle for" in router.log_text()


def test_management_pinned_models_are_never_evicted(start_router, tiny_model: Path) -> None:
    preset = tiny_preset(tiny_model, ["pinned"], extra="pin = true\n") + f"[other]\nmodel = {tiny_model}\n"
    router = start_router(preset, "--models-max", "1")
    assert router.client.post("/v1/chat/completions", json={"model": "pinned", **CHAT}).status_code == 200
    refused = router.client.post("/v1/chat/completions", json={"model": "other", **CHAT})
    assert refused.status_code == 503
    assert "all 1 resident models are pinned" in refused.json()["error"]["message"]
    assert router.status("pinned") == "loaded"


def test_management_memory_admission_refuses_with_the_numbers(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny"]), "--memory-reserve-mb", "100000000")
    refused = router.client.post("/v1/chat/completions", json={"model": "tiny", **CHAT})
    assert refused.status_code == 503
    message = refused.json()["error"]["message"]
    assert "cannot load 'tiny': it needs about" in message and "MiB are free for it" in message
    assert "available memory less the 100000000 MiB reserve" in message
    assert router.status("tiny") == "unloaded"


def test_management_models_show_their_resident_memory(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny"]))
    router.client.post("/v1/chat/completions", json={"model": "tiny", **CHAT})
    # Sampled off the event loop once a second: it appears shortly after the child is up.
    deadline = time.monotonic() + 10
    while "memory" not in (entry := router.model_entry("tiny")):
        assert time.monotonic() < deadline, "no memory figure for a running model"
        time.sleep(0.1)
    assert entry["memory"]["rss_bytes"] > 10 * 2**20
    router.client.post("/models/unload", json={"model": "tiny"})
    assert "memory" not in router.wait_status("tiny", "unloaded")


def test_management_router_refuses_to_start_when_startup_models_do_not_fit(tmp_path: Path, tiny_model: Path) -> None:
    preset = tmp_path / "p.ini"
    preset.write_text(tiny_preset(tiny_model, ["a", "b"], extra="load-on-startup = true\n"))
    too_many = subprocess.run([sys.executable, "-m", "router", "--port", "0", "--models-preset", str(preset),
                               "--models-max", "1"], capture_output=True, text=True, timeout=60)
    assert too_many.returncode == 2
    assert "2 models have load-on-startup (a, b) but --models-max is 1" in too_many.stderr
    no_memory = subprocess.run([sys.executable, "-m", "router", "--port", "0", "--models-preset", str(preset),
                                "--memory-reserve-mb", "100000000"], capture_output=True, text=True, timeout=60)
    assert no_memory.returncode == 2
    assert "the load-on-startup models need about" in no_memory.stderr


def test_management_reload_restarts_changed_models_and_drops_removed_ones(start_router, tiny_model: Path,
                                                                          tmp_path: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["a", "b"]))
    preset = Path(router.proc.args[router.proc.args.index("--models-preset") + 1])
    assert router.client.post("/v1/chat/completions", json={"model": "a", **CHAT}).status_code == 200
    old_pid = router.child_of("a").pid
    feed = EventFeed(router.url)
    try:
        preset.write_text(tiny_preset(tiny_model, ["a"], extra="ctx-size = 1024\n") + f"[c]\nmodel = {tiny_model}\n")
        listing = router.client.get("/models", params={"reload": "1"}).json()
        assert sorted(m["id"] for m in listing["data"]) == ["a", "c"]
        feed.wait_for(lambda e: e["event"] == "model_remove" and e["model"] == "b")
        feed.wait_for(lambda e: e["event"] == "models_reload" and e["model"] == "*")
        router.wait_status("a", "loaded")
        args = router.model_entry("a")["status"]["args"]
        assert args[args.index("--ctx-size") + 1] == "1024"
        assert router.child_of("a").pid != old_pid
        assert router.status("c") == "unloaded"
        preset.write_text("[broken]\nnot-a-key = 1\n")
        refused = router.client.get("/models", params={"reload": "1"})
        assert refused.status_code == 400 and "unknown key 'not-a-key'" in refused.json()["error"]["message"]
        assert sorted(m["id"] for m in router.client.get("/models").json()["data"]) == ["a", "c"]
    finally:
        feed.close()


def test_management_memory_budget_evicts_idle_models_to_make_room(start_router, tiny_model: Path) -> None:
    from router.memory import MIB, estimate_model_bytes

    one_model_mb = estimate_model_bytes(str(tiny_model), 2048) / MIB  # type: ignore[operator]
    # Room for one tiny model at a time, and not for two.
    budget = f"{one_model_mb * 1.5:.0f}"
    router = start_router(tiny_preset(tiny_model, ["a", "b"]), "--models-memory-mb", budget, "--models-max", "0")
    assert router.client.post("/v1/chat/completions", json={"model": "a", **CHAT}).status_code == 200
    assert router.client.post("/v1/chat/completions", json={"model": "b", **CHAT}).status_code == 200
    assert router.status("a") == "unloaded" and router.status("b") == "loaded"
    assert "evicting a (least recently used, memory) to make room for b" in router.log_text()
    small = start_router(tiny_preset(tiny_model, ["a"]), "--models-memory-mb", f"{one_model_mb / 2:.0f}")
    refused = small.client.post("/v1/chat/completions", json={"model": "a", **CHAT})
    assert refused.status_code == 503 and "(--models-memory-mb" in refused.json()["error"]["message"]
