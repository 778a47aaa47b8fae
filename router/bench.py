"""`modelyard bench`: a load sweep against any OpenAI-compatible endpoint.

For each concurrency level it sends `--requests` streaming completions, `concurrency` at a time,
and reports success, failures, latency (avg, p95), time to first token (p50, p95), requests/s,
generated tokens/s and, where the target exposes Prometheus metrics, the batch size it observed
(sequences per decode call). Works against a modelyard child or router, llama.cpp's llama-server
and llama-cpp-python's server. Output: a Markdown table on stdout and, with --json, a JSON file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "small", "bird", "sings",
         "in", "old", "oak", "tree", "near", "quiet", "river", "that", "flows", "through", "green", "valley")


@dataclass
class RequestResult:
    ok: bool
    latency_s: float
    ttft_s: float | None
    completion_tokens: int
    error: str = ""


@dataclass
class LevelReport:
    concurrency: int
    requests: int
    success: int
    fail: int
    avg_latency_s: float
    p95_latency_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    requests_per_s: float
    generated_tokens_per_s: float
    observed_batch: float | None
    wall_s: float
    errors: list[str] = field(default_factory=list)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def make_prompt(n_words: int, salt: int) -> str:
    words = [WORDS[(i * 7 + salt) % len(WORDS)] for i in range(n_words)]
    return f"Story {salt}: " + " ".join(words)


async def one_request(client: httpx.AsyncClient, url: str, model: str | None, prompt: str,
                      max_tokens: int, headers: dict[str, str]) -> RequestResult:
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0.0,
                            "ignore_eos": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    started = time.perf_counter()
    first: float | None = None
    chunks = 0
    usage_tokens: int | None = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                return RequestResult(False, time.perf_counter() - started, None, 0,
                                     f"HTTP {response.status_code}: {response.text[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    return RequestResult(False, time.perf_counter() - started, first, chunks, str(data["error"]))
                if data.get("usage"):
                    usage_tokens = int(data["usage"].get("completion_tokens", 0))
                for choice in data.get("choices") or []:
                    if choice.get("text"):
                        chunks += 1
                        if first is None:
                            first = time.perf_counter() - started
    except httpx.HTTPError as exc:
        return RequestResult(False, time.perf_counter() - started, first, chunks, f"{type(exc).__name__}: {exc}")
    return RequestResult(True, time.perf_counter() - started, first,
                         usage_tokens if usage_tokens is not None else chunks)


async def _scrape(client: httpx.AsyncClient, url: str, model: str | None) -> dict[str, float]:
    params = {"model": model, "autoload": "false"} if model else None
    try:
        response = await client.get(url + "/metrics", params=params)
    except httpx.HTTPError:
        return {}
    if response.status_code != 200:
        return {}
    values: dict[str, float] = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                values[name.split("{")[0]] = float(value)
            except ValueError:
                continue
    return values


def _observed_batch(before: dict[str, float], after: dict[str, float]) -> float | None:
    decodes = after.get("llamacpp:n_decode_total", 0) - before.get("llamacpp:n_decode_total", 0)
    sequences = (after.get("modelyard:sequences_sampled_total", 0)
                 - before.get("modelyard:sequences_sampled_total", 0))
    if decodes > 0 and sequences > 0:
        return sequences / decodes
    return after.get("llamacpp:n_busy_slots_per_decode")


async def run_level(url: str, model: str | None, concurrency: int, requests: int, prompt_words: int,
                    max_tokens: int, headers: dict[str, str]) -> LevelReport:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        before = await _scrape(client, url, model)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)
        results: list[RequestResult] = []

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                # Prompts differ across levels too, so no level is served from a prompt cache.
                prompt = make_prompt(prompt_words, concurrency * 1000 + i)
                result = await one_request(client, url, model, prompt, max_tokens, headers)
                if not result.ok and result.error.startswith("RemoteProtocolError") and result.ttft_s is None:
                    # A keep-alive connection the server had just closed (llama-server does this):
                    # the request never reached it, so sending it again is what any client does.
                    result = await one_request(client, url, model, prompt, max_tokens, headers)
                results.append(result)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        after = await _scrape(client, url, model)
    good = [r for r in results if r.ok]
    latencies = [r.latency_s for r in good]
    ttfts = [r.ttft_s for r in good if r.ttft_s is not None]
    return LevelReport(
        concurrency=concurrency, requests=requests, success=len(good), fail=len(results) - len(good),
        avg_latency_s=statistics.fmean(latencies) if latencies else 0.0,
        p95_latency_s=_percentile(latencies, 0.95),
        ttft_p50_s=_percentile(ttfts, 0.5), ttft_p95_s=_percentile(ttfts, 0.95),
        requests_per_s=len(good) / wall if wall else 0.0,
        generated_tokens_per_s=sum(r.completion_tokens for r in good) / wall if wall else 0.0,
        observed_batch=_observed_batch(before, after), wall_s=wall,
        errors=sorted({r.error for r in results if not r.ok})[:5],
    )


def markdown_table(name: str, reports: list[LevelReport]) -> str:
    lines = [f"### {name}", "",
             "| clients | ok | fail | avg latency s | p95 latency s | TTFT p50 s | TTFT p95 s | req/s | gen tok/s "
             "| batch |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in reports:
        batch = f"{r.observed_batch:.2f}" if r.observed_batch is not None else "-"
        lines.append(f"| {r.concurrency} | {r.success} | {r.fail} | {r.avg_latency_s:.2f} | {r.p95_latency_s:.2f} "
                     f"| {r.ttft_p50_s:.3f} | {r.ttft_p95_s:.3f} | {r.requests_per_s:.2f} "
                     f"| {r.generated_tokens_per_s:.1f} | {batch} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelyard bench", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--model", help="model name to send (needed for a router)")
    parser.add_argument("--name", default=None, help="label for the report")
    parser.add_argument("--concurrency", default="1,4,8", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=16, help="requests per level")
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--json", dest="json_path", default=None, help="write the reports here")
    return parser


async def sweep(args: argparse.Namespace) -> list[LevelReport]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    levels = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    # One warm-up request so the first level does not pay for a cold start.
    async with httpx.AsyncClient(timeout=600.0) as client:
        await one_request(client, args.url, args.model, make_prompt(8, 999), 4, headers)
    return [await run_level(args.url, args.model, c, max(args.requests, c), args.prompt_words, args.max_tokens,
                            headers) for c in levels]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    reports = asyncio.run(sweep(args))
    name = args.name or args.url
    print(markdown_table(name, reports))
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump({"name": name, "url": args.url, "model": args.model, "max_tokens": args.max_tokens,
                       "prompt_words": args.prompt_words, "levels": [asdict(r) for r in reports]}, f, indent=2)
    if any(r.fail for r in reports):
        sys.exit(1)
