#!/usr/bin/env python3
"""What the router adds to a request: the same child asked directly and through the router.

One router serving the tiny random-weight model (the child's own work is then as small as a
completion gets), and the very same child process asked directly on its port. Every
measurement alternates direct and routed rounds, so machine noise hits both alike.

- `/v1/completions` with `max_tokens: 1`, one client, on one keep-alive connection and on a fresh
  connection per request: p50 and p95 latency.
- 16 clients on keep-alive connections for a few seconds: requests per second.
- small routes on a keep-alive connection: the router's `/health` and `/v1/models`, the child's
  `/props`.

Latencies are taken by a minimal HTTP/1.1 client on raw asyncio streams (uvloop). Throughput is
taken by `wrk` when it is installed (`make bench-router` installs Debian's): on 2 cores a Python
load generator takes a core of its own from the servers it measures. `--json FILE` keeps the
figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from tiny_model import write_tiny_model  # noqa: E402

COMPLETION = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 1, "temperature": 0}).encode()


def raw_request(method: str, path: str, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


class Connection:
    """One keep-alive HTTP/1.1 connection; `ask` sends a request and reads the whole answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def ask(self, request: bytes) -> int:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if "content-length" in headers:
            await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        return status

    def close(self) -> None:
        self.writer.close()


async def ask_once(port: int, request: bytes) -> int:
    connection = await Connection.open(port)
    try:
        return await connection.ask(request)
    finally:
        connection.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def latencies(port: int, request: bytes, count: int, fresh: bool) -> list[float]:
    """Milliseconds per request, one client, sequential."""
    times: list[float] = []
    connection = None if fresh else await Connection.open(port)
    try:
        if connection is not None:
            assert await connection.ask(request) == 200  # the connection is open and warm
        for _ in range(count):
            began = time.perf_counter()
            status = await (ask_once(port, request) if connection is None else connection.ask(request))
            times.append((time.perf_counter() - began) * 1000.0)
            assert status == 200, status
    finally:
        if connection is not None:
            connection.close()
    return times


async def throughput(port: int, request: bytes, clients: int, seconds: float) -> float:
    """Requests per second answered to `clients` concurrent keep-alive clients."""
    connections = [await Connection.open(port) for _ in range(clients)]
    done = 0
    deadline = time.perf_counter() + seconds

    async def client(connection: Connection) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            assert await connection.ask(request) == 200
            done += 1

    began = time.perf_counter()
    await asyncio.gather(*(client(c) for c in connections))
    elapsed = time.perf_counter() - began
    for connection in connections:
        connection.close()
    return done / elapsed


WRK_SCRIPT = """wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
"""


def wrk_throughput(port: int, clients: int, seconds: float, workdir: Path) -> float:
    script = workdir / "post.lua"
    script.write_text(WRK_SCRIPT % COMPLETION.decode())
    out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s", "-s", str(script),
                          f"http://127.0.0.1:{port}/v1/completions"], capture_output=True, text=True, check=True)
    if "Non-2xx" in out.stdout:
        raise RuntimeError(f"wrk saw errors:\n{out.stdout}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    assert match, out.stdout
    return float(match.group(1))


async def alternate(rounds: int, direct: Callable[[], Awaitable[list[float]]],
                    routed: Callable[[], Awaitable[list[float]]]) -> tuple[list[float], list[float]]:
    both: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        both[0].extend(await direct())
        both[1].extend(await routed())
    return both


def start_router(model: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    preset = workdir / "bench.ini"
    preset.write_text(f"[tiny]\nmodel = {model}\nc = 4096\nnp = 8\nt = 1\nload-on-startup = true\n")
    log = open(workdir / "router.log", "wb")  # noqa: SIM115 - lives as long as the router
    proc = subprocess.Popen([sys.executable, "-m", "router", "--models-preset", str(preset), "--port", "0"],
                            stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = (workdir / "router.log").read_text(errors="replace")
        if "listening on http://" in text:
            router_port = int(text.split("listening on http://", 1)[1].split(":", 1)[1].split()[0])
            break
        time.sleep(0.05)
    else:
        raise RuntimeError("the router did not start")
    while time.monotonic() < deadline:
        entry = httpx.get(f"http://127.0.0.1:{router_port}/models").json()["data"][0]
        if entry["status"]["value"] == "loaded":
            return proc, router_port, int(entry["meta"]["port"])
        time.sleep(0.1)
    raise RuntimeError("the model did not load")


def row(name: str, direct: list[float], routed: list[float]) -> dict[str, float | str]:
    d50, r50 = statistics.median(direct), statistics.median(routed)
    d95, r95 = percentile(direct, 0.95), percentile(routed, 0.95)
    return {"measure": name, "direct_p50_ms": d50, "routed_p50_ms": r50, "added_p50_ms": r50 - d50,
            "direct_p95_ms": d95, "routed_p95_ms": r95, "added_p95_ms": r95 - d95}


async def measure(args: argparse.Namespace, router_port: int, child_port: int, workdir: Path) -> dict[str, object]:
    completion = raw_request("POST", "/v1/completions", COMPLETION)
    per_round = max(1, args.requests // args.rounds)
    rows = []
    for name, fresh in (("completion, keep-alive", False), ("completion, fresh connection", True)):
        direct, routed = await alternate(
            args.rounds, lambda fresh=fresh: latencies(child_port, completion, per_round, fresh),
            lambda fresh=fresh: latencies(router_port, completion, per_round, fresh))
        rows.append(row(name, direct, routed))
    small = {}
    for label, port, path in (("router /health", router_port, "/health"),
                              ("router /v1/models", router_port, "/v1/models"),
                              ("child /props", child_port, "/props"), ("child /health", child_port, "/health")):
        times = await latencies(port, raw_request("GET", path), args.requests, fresh=False)
        small[label] = {"p50_ms": statistics.median(times), "p95_ms": percentile(times, 0.95)}
    # This machine's speed drifts by tens of percent from one second to the next: many short rounds,
    # each a pair taken back to back (which one goes first alternates), and the median of the
    # pairs' ratios.
    rates: tuple[list[float], list[float]] = ([], [])
    use_wrk = shutil.which("wrk") is not None and not args.python_client
    for round_index in range(args.throughput_rounds):
        pair = [(child_port, rates[0]), (router_port, rates[1])]
        for port, into in pair if round_index % 2 == 0 else reversed(pair):
            if use_wrk:
                into.append(await asyncio.to_thread(wrk_throughput, port, args.clients, args.seconds, workdir))
            else:
                into.append(await throughput(port, completion, args.clients, args.seconds))
    ratios = [r / d for d, r in zip(*rates, strict=True)]
    return {"latency": rows, "small_routes": small,
            "throughput": {"clients": args.clients, "client": "wrk" if use_wrk else "python",
                           "direct_rps": statistics.median(rates[0]), "routed_rps": statistics.median(rates[1]),
                           "ratio": statistics.median(ratios), "round_ratios": ratios}}


def report(results: dict[str, object]) -> str:
    lines = ["| measure | direct p50 | router p50 | added p50 | direct p95 | router p95 | added p95 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["latency"]:  # type: ignore[attr-defined]
        lines.append(f"| {r['measure']} | {r['direct_p50_ms']:.2f} ms | {r['routed_p50_ms']:.2f} ms | "
                     f"{r['added_p50_ms']:+.2f} ms | {r['direct_p95_ms']:.2f} ms | {r['routed_p95_ms']:.2f} ms | "
                     f"{r['added_p95_ms']:+.2f} ms |")
    t = results["throughput"]
    lines.append("")
    ratios = sorted(t["round_ratios"])  # type: ignore[index]
    lines.append(f"{t['clients']} clients, keep-alive ({t['client']}): direct {t['direct_rps']:.0f} req/s, "  # type: ignore[index]
                 f"router {t['routed_rps']:.0f} req/s (medians); router/direct per round: median "
                 f"{t['ratio']:.2f}x, quartiles {ratios[len(ratios) // 4]:.2f}-{ratios[3 * len(ratios) // 4]:.2f}, "  # type: ignore[index]
                 f"{len(ratios)} rounds")
    lines.append("")
    lines.append("| small route, keep-alive | p50 | p95 |")
    lines.append("|---|---:|---:|")
    for label, s in results["small_routes"].items():  # type: ignore[attr-defined]
        lines.append(f"| {label} | {s['p50_ms']:.2f} ms | {s['p95_ms']:.2f} ms |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="per measure and target")
    parser.add_argument("--rounds", type=int, default=4, help="alternations of direct and routed")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=2.0, help="per throughput round and target")
    parser.add_argument("--throughput-rounds", type=int, default=20)
    parser.add_argument("--python-client", action="store_true", help="measure throughput without wrk")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = write_tiny_model(workdir / "tiny.gguf")
        proc, router_port, child_port = start_router(model, workdir)
        try:
            results = uvloop.run(measure(args, router_port, child_port, workdir))
        finally:
            proc.terminate()
            proc.wait(30)
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
