"""The child on its own: a plain OpenAI server by hand, and the protocol side under a router."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from child.protocol import ChildState, parse_child_line


def _start_child(model: Path, *flags: str, under_router: bool) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_SERVER_ROUTER_PORT"}
    if under_router:
        env["LLAMA_SERVER_ROUTER_PORT"] = "1"
    return subprocess.Popen(
        [sys.executable, "-m", "child", "-m", str(model), "--port", "0", "-c", "1024", "-np", "2",
         "-t", "1", *flags],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
    )


def _read_until_ready(proc: subprocess.Popen[str]) -> tuple[list[str], dict]:
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:  # bounded by the test timeout
        lines.append(line)
        message = parse_child_line(line)
        assert message is not None, f"non-protocol line on stdout: {line!r}"
        if message.state == ChildState.READY:
            return lines, message.payload
    raise AssertionError(f"child ended before ready: {proc.stderr.read() if proc.stderr else ''}")


@pytest.fixture
def routed_child(tiny_model: Path) -> Iterator[tuple[subprocess.Popen[str], dict, list[str]]]:
    proc = _start_child(tiny_model, under_router=True)
    lines, payload = _read_until_ready(proc)
    yield proc, payload, lines
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def test_child_under_router_prints_only_protocol_lines_and_reports_port(routed_child) -> None:
    proc, payload, lines = routed_child
    states = [parse_child_line(line).state for line in lines]  # type: ignore[union-attr]
    assert states[0] == ChildState.LOADING and states[-1] == ChildState.READY
    progress = [parse_child_line(line).payload["value"] for line in lines[:-1]]  # type: ignore[union-attr]
    assert progress[0] == 0.0 and progress[-1] == 1.0 and progress == sorted(progress)
    for key in ("port", "model_path", "n_ctx", "n_params", "size", "n_vocab", "chat_template"):
        assert key in payload
    assert payload["n_ctx"] == 1024 and payload["chat_template"] is True
    health = httpx.get(f"http://127.0.0.1:{payload['port']}/health", timeout=10)
    assert health.json() == {"status": "ok"}


def test_child_exit_command_exits_zero(routed_child) -> None:
    proc, _, _ = routed_child
    assert proc.stdin is not None
    proc.stdin.write("cmd_router_to_child:exit\n")
    proc.stdin.flush()
    assert proc.wait(15) == 0


def test_child_exits_at_once_on_stdin_eof(routed_child) -> None:
    proc, _, _ = routed_child
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(5)
    assert proc.returncode is not None


def test_child_exits_on_stdin_eof_while_loading(tiny_model: Path) -> None:
    proc = _start_child(tiny_model, under_router=True)
    assert proc.stdin is not None and proc.stdout is not None
    first = proc.stdout.readline()
    assert parse_child_line(first).state == ChildState.LOADING  # type: ignore[union-attr]
    proc.stdin.close()
    proc.wait(10)


@pytest.fixture
def plain_child(tiny_model: Path) -> Iterator[str]:
    """A child started by hand: no protocol lines; find its port from its log."""
    proc = _start_child(tiny_model, under_router=False)
    assert proc.stderr is not None
    url = ""
    for line in proc.stderr:
        if "serving" in line and "http://" in line:
            url = line.strip().rsplit(" ", 1)[-1]
            break
    assert url, "child did not start"
    assert proc.stdout is not None
    yield url
    proc.terminate()
    proc.wait(15)
    assert proc.stdout.read() == "", "a child started by hand must print no protocol lines"


def test_child_serves_chat_and_completions_with_usage(plain_child: str) -> None:
    with httpx.Client(base_url=plain_child, timeout=30) as client:
        chat = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 8,
            "temperature": 0, "ignore_eos": True})
        assert chat.status_code == 200, chat.text
        body = chat.json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 8
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 8
        completion = client.post("/v1/completions", json={"prompt": "the capital of", "max_tokens": 5,
                                                          "temperature": 0, "ignore_eos": True})
        assert completion.status_code == 200
        assert completion.json()["object"] == "text_completion"
        assert completion.json()["usage"]["completion_tokens"] == 5
        models = client.get("/v1/models").json()
        assert models["data"][0]["id"] == "tiny"
        assert client.get("/props").json()["total_slots"] == 2


def test_child_runs_on_the_libllama_that_make_install_built(plain_child: str) -> None:
    # `make install` builds llama-cpp-python with modelyard's ggml patches (scripts/build-libllama.sh);
    # an install that silently fell back to the upstream wheel would still pass every other test.
    build_info = httpx.get(plain_child + "/props", timeout=10).json()["build_info"]
    installed = importlib.metadata.version("llama-cpp-python")  # the pin of pyproject.toml, plus the label
    assert build_info == f"llama-cpp-python {installed}" and "+modelyard." in installed, build_info


def test_child_streams_openai_chunks_and_usage(plain_child: str) -> None:
    with httpx.Client(base_url=plain_child, timeout=30) as client, client.stream(
        "POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "stream": True,
            "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finals and finals[0]["choices"][0]["finish_reason"] == "length"
    assert "predicted_per_second" in finals[0]["timings"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


@pytest.mark.parametrize(("path", "body", "fragment"), [
    ("/v1/chat/completions", b"{not json", "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", "must be a JSON object"),
    ("/v1/chat/completions", b'{"model": "x"}', "messages"),
    ("/v1/chat/completions", b'{"messages": []}', "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}', "role"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
     "temperature"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 100000}', "exceeds a slot's context of 512"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}', "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"abc": 1}}', "logit_bias"),
    ("/v1/completions", b'{}', "prompt"),
    ("/v1/streams/lookup", b"{broken", "not valid JSON"),
    ("/v1/streams/lookup", b'{"conversation_ids": "x"}', "conversation_ids"),
])
def test_child_bad_requests_get_400_in_openai_shape(plain_child: str, path: str, body: bytes,
                                                    fragment: str) -> None:
    response = httpx.post(plain_child + path, content=body, timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == 400 and error["type"] == "invalid_request_error"
    assert fragment in error["message"]
    # The child is still healthy after every bad request.
    assert httpx.get(plain_child + "/health", timeout=10).status_code == 200


def test_child_prompt_longer_than_the_slot_is_refused_with_numbers(plain_child: str) -> None:
    response = httpx.post(plain_child + "/v1/completions", json={"prompt": [300] * 600, "max_tokens": 4},
                          timeout=30)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "600 tokens" in message and "512" in message


def test_child_load_failure_exits_nonzero_with_reason(tmp_path: Path) -> None:
    proc = _start_child(tmp_path / "missing.gguf", under_router=False)
    assert proc.wait(30) == 1
    assert proc.stderr is not None
    assert "model file not found" in proc.stderr.read()


def test_child_stop_strings_never_leak(plain_child: str) -> None:
    with httpx.Client(base_url=plain_child, timeout=30) as client:
        full = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 40, "temperature": 0,
                                                    "ignore_eos": True}).json()["choices"][0]["text"]
        assert len(full) > 6
        stop = full[3:6]
        cut = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 40, "temperature": 0,
                                                   "ignore_eos": True, "stop": [stop]}).json()
        text = cut["choices"][0]["text"]
        assert cut["choices"][0]["finish_reason"] == "stop"
        assert text == full[: full.index(stop)]


def test_child_tokenize_detokenize_and_apply_template(plain_child: str) -> None:
    with httpx.Client(base_url=plain_child, timeout=30) as client:
        tokens = client.post("/tokenize", json={"content": "hello world"}).json()["tokens"]
        assert tokens and all(isinstance(t, int) for t in tokens)
        assert client.post("/detokenize", json={"tokens": tokens}).json()["content"].strip() == "hello world"
        pieces = client.post("/tokenize", json={"content": "hello", "with_pieces": True}).json()["tokens"]
        assert "".join(p["piece"] for p in pieces).strip() == "hello"
        assert client.post("/detokenize", json={"tokens": [10**9]}).status_code == 400
        prompt = client.post("/apply-template", json={"messages": [{"role": "user", "content": "hi"}]}).json()
        assert prompt["prompt"] == "<|user|>hi\n<|assistant|>"
