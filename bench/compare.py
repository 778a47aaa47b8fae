#!/usr/bin/env python3
"""Run `modelyard bench` against several servers on the same model, one after the other.

Targets: modelyard's child, modelyard's router in front of it, llama-cpp-python's server (when
`llama_cpp.server` imports, e.g. after `pip install 'llama-cpp-python[server]'`), and llama.cpp's
llama-server (when LLAMA_SERVER_BIN points at it or it is on PATH). Same model, threads, context
and slots for all. Prints one Markdown table per target with its resident memory, and writes JSON.

    python bench/compare.py [--threads 2] [--slots 8] [--ctx 4096] [--concurrency 1,4,8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from child.serving import free_port  # noqa: E402
from router import bench  # noqa: E402
from router.bundled_models import SMOLLM2, resolve_package_model  # noqa: E402


def smollm2_path() -> str:
    return resolve_package_model(SMOLLM2)


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}")
        try:
            status = httpx.get(url + "/health", timeout=2).status_code
            if status == 404:  # llama-cpp-python's server has no /health; its /v1/models waits for the model
                status = httpx.get(url + "/v1/models", timeout=2).status_code
            if status == 200:  # a 503 means the model is still loading
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become healthy")


def tree_rss_mb(pid: int) -> float:
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20


def targets(args: argparse.Namespace, model: str, log_dir: Path) -> list[tuple[str, list[str], str | None, str]]:
    """(name, command, model name to send, log file) per available target; {port} is filled in later."""
    common = ["-m", model, "-t", str(args.threads), "-c", str(args.ctx), "-np", str(args.slots)]
    found = [("modelyard child", [sys.executable, "-m", "child", *common, "--port", "{port}"], None, "child")]
    preset = log_dir / "bench.ini"
    preset.write_text(f"[smollm2]\nmodel = {model}\nt = {args.threads}\nc = {args.ctx}\nnp = {args.slots}\n"
                      "load-on-startup = true\n")
    found.append(("modelyard router -> child", [sys.executable, "-m", "router", "--models-preset", str(preset),
                                                 "--port", "{port}"], "smollm2", "router"))
    llama_server = os.environ.get("LLAMA_SERVER_BIN") or shutil.which("llama-server")
    if llama_server:
        found.append(("llama.cpp llama-server", [llama_server, *common, "--host", "127.0.0.1", "--port", "{port}",
                                                 "--metrics"], None, "llama-server"))
    lcp_python = os.environ.get("LLAMA_CPP_PYTHON") or sys.executable
    probe = subprocess.run([lcp_python, "-c", "import llama_cpp.server"], capture_output=True)
    if probe.returncode == 0:
        found.append(("llama-cpp-python server", [
            lcp_python, "-m", "llama_cpp.server", "--model", model, "--n_threads", str(args.threads),
            "--n_ctx", str(args.ctx), "--host", "127.0.0.1", "--port", "{port}",
            # By default it aborts the running stream when a new request arrives: queue them instead.
            "--interrupt_requests", "False"], None, "llama-cpp-python"))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--only", default="", help="comma-separated target names to keep (substring match)")
    parser.add_argument("--json", default="bench/results.json")
    args = parser.parse_args()
    model = smollm2_path()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp)
        for name, command, model_name, log_name in targets(args, model, log_dir):
            if args.only and not any(word.strip() in name for word in args.only.split(",")):
                continue
            port = free_port()
            argv = [part.replace("{port}", str(port)) for part in command]
            with open(log_dir / f"{log_name}.log", "wb") as log:
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            url = f"http://127.0.0.1:{port}"
            try:
                wait_healthy(url, proc)
                if model_name:  # the router is up before its child: wait for the model itself
                    deadline = time.monotonic() + 120
                    while not any(m["id"] == model_name and m["status"]["value"] == "loaded"
                                  for m in httpx.get(url + "/models").json()["data"]):
                        if time.monotonic() > deadline:
                            raise RuntimeError("router's model did not load")
                        time.sleep(0.2)
                sweep_args = bench.build_parser().parse_args([
                    "--url", url, "--concurrency", args.concurrency, "--requests", str(args.requests),
                    "--max-tokens", str(args.max_tokens)] + (["--model", model_name] if model_name else []))
                import asyncio

                reports = asyncio.run(bench.sweep(sweep_args))
                rss = tree_rss_mb(proc.pid)
            finally:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
            print(bench.markdown_table(f"{name} (RSS after the sweep: {rss:.0f} MB)", reports))
            print(flush=True)
            results.append({"name": name, "rss_mb": rss, "command": " ".join(argv),
                            "levels": [asdict(r) for r in reports]})
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"model": model, "threads": args.threads, "slots": args.slots,
                                           "ctx": args.ctx, "max_tokens": args.max_tokens,
                                           "targets": results}, indent=2))


if __name__ == "__main__":
    main()
