"""Operations: router metrics, model logs, body limit, CORS, model names as untrusted input."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from conftest import fake_bin, tiny_preset

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0,
        "ignore_eos": True}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_operations_router_metrics_count_and_include_children(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["a", "b"], extra="sleep-idle-seconds = 300\n"))
    for _ in range(2):
        assert router.client.post("/v1/chat/completions", json={"model": "a", **CHAT}).status_code == 200
    router.client.post("/v1/chat/completions", json={"model": "a", "prompt": "x", "max_tokens": 99999,
                                                      "messages": [{"role": "user", "content": "x"}]})
    samples = _samples(router.client.get("/metrics").text)
    assert samples[("modelyard_router_requests_total", (("code", "200"), ("model", "a")))] == 2
    assert samples[("modelyard_router_requests_total", (("code", "400"), ("model", "a")))] == 1
    assert samples[("modelyard_router_loads_total", (("model", "a"),))] == 1
    assert samples[("modelyard_router_load_duration_seconds_count", (("model", "a"),))] == 1
    assert samples[("modelyard_router_model_status", (("model", "a"), ("peer", ""), ("status", "loaded")))] == 1
    assert samples[("modelyard_router_model_status", (("model", "b"), ("peer", ""), ("status", "unloaded")))] == 1
    assert samples[("modelyard_router_proxied_bytes_total", (("model", "a"),))] > 0
    # The child's own metrics, labelled with its model; b is not running, so it was not loaded.
    assert samples[("llamacpp:tokens_predicted_total", (("model", "a"),))] == 8
    assert not any(name.startswith("llamacpp:") and labels == (("model", "b"),) for name, labels in samples)
    assert router.status("b") == "unloaded"


def test_operations_model_logs_replay_recent_lines_then_follow(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["a"]))
    assert router.client.post("/v1/chat/completions", json={"model": "a", **CHAT}).status_code == 200
    assert router.client.get("/models/logs", params={"model": "nope"}).status_code == 404
    lines: list[str] = []
    replayed = 0  # lines already in the ring when the unload started
    live_exit_line = False
    unloader = threading.Thread(target=lambda: httpx.post(router.url + "/models/unload", json={"model": "a"},
                                                          timeout=30))
    with httpx.stream("GET", router.url + "/models/logs", params={"model": "a"}, timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            entry = json.loads(line[6:])
            lines.append(entry["line"])
            if not unloader.is_alive() and "serving a on http://" in entry["line"]:
                # The replay reached the child's last line so far: every line after this one is
                # live, and unloading makes the child log one more.
                replayed = len(lines)
                unloader.start()
            elif replayed and "exit command received from the router" in entry["line"]:
                live_exit_line = True
                break
    unloader.join(30)
    assert any("loaded" in line and "tiny.gguf" in line for line in lines[:replayed])  # replayed from the ring
    assert live_exit_line, "the exit line never came live"
    assert not any("exit command received" in line for line in lines[:replayed])


def test_operations_oversized_bodies_get_413(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["a"]), "--max-body-bytes", "1000")
    big = {"model": "a", "messages": [{"role": "user", "content": "x" * 5000}]}
    response = router.client.post("/v1/chat/completions", json=big)
    assert response.status_code == 413 and response.json()["error"]["code"] == 413

    def chunks():
        yield b'{"model": "a", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}]}'

    chunked = router.client.post("/v1/chat/completions", content=chunks(),
                                 headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    assert router.status("a") == "unloaded"
    assert router.client.post("/v1/chat/completions", json={"model": "a", **CHAT}).status_code == 200


def test_operations_cors_is_off_unless_asked(start_router, tiny_model: Path) -> None:
    preflight = {"Origin": "http://example.test", "Access-Control-Request-Method": "POST"}
    off = start_router(tiny_preset(tiny_model, ["a"]))
    assert "access-control-allow-origin" not in off.client.options("/v1/chat/completions", headers=preflight).headers
    on = start_router(tiny_preset(tiny_model, ["a"]), "--cors-origins", "http://example.test")
    answer = on.client.options("/v1/chat/completions", headers=preflight)
    assert answer.headers["access-control-allow-origin"] == "http://example.test"


def test_operations_model_names_never_reach_a_path(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["a"]))
    for name in ("../../etc/passwd", "/etc/passwd", "a/../../x"):
        assert router.client.post("/v1/chat/completions", json={"model": name, **CHAT}).status_code == 400
        assert router.client.post("/models/load", json={"model": name}).status_code == 404
        assert router.client.delete("/models", params={"model": name}).status_code == 404
        refused = router.client.post("/models", json={"model": name})
        assert refused.status_code == 400


def test_operations_api_key_guards_everything_but_health(start_router, tiny_model: Path) -> None:
    preset = tiny_preset(tiny_model, ["a"]) + f"[f]\nmodel = /x.gguf\nbin = {fake_bin()}\n"
    router = start_router(preset, "--api-key", "k3y")
    assert router.client.get("/health").status_code == 200
    for method, path in [("GET", "/models"), ("GET", "/v1/models"), ("GET", "/models/sse"),
                         ("GET", "/models/logs?model=a"), ("GET", "/metrics"), ("GET", "/props"),
                         ("POST", "/v1/chat/completions"), ("POST", "/models/load")]:
        assert router.client.request(method, path).status_code == 401, path
        assert router.client.request(method, path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = router.client.post("/v1/chat/completions", json={"model": "f", "messages": []},
                            headers={"Authorization": "Bearer k3y"})
    assert ok.status_code == 200
    # The child never sees the key.
    assert ok.json()["received_authorization"] is None


def test_operations_several_api_keys_from_the_list_and_the_file(start_router, tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("from-file-1\n\n  from-file-2  \n")
    router = start_router(f"[f]\nmodel = /x.gguf\nbin = {fake_bin()}\n", "--api-key", "one, two",
                          "--api-key-file", str(keys))
    for key in ("one", "two", "from-file-1", "from-file-2"):
        assert router.client.get("/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200, key
        assert router.client.get("/models", headers={"x-api-key": key}).status_code == 200, key
    for wrong in ("one, two", "one,two", "three", "from-file-3", "on"):
        assert router.client.get("/models", headers={"x-api-key": wrong}).status_code == 401, wrong
    assert router.client.get("/models").status_code == 401
