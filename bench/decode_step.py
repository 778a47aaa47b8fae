#!/usr/bin/env python3
"""Time one `llama_decode` on SmolLM2: N sequences x 1 token, and a prefill of 8 prompts x 32 tokens.

With --baseline-libs DIR it alternates between the libggml in this virtualenv and the one in DIR
(LD_LIBRARY_PATH wins over libllama's RUNPATH), e.g. the upstream build that `make bench` installs:

    .venv/bin/python bench/decode_step.py --rounds 8 \\
        --baseline-libs .venv-bench/lib/python3.11/site-packages/llama_cpp/lib

and prints, per shape, the best time of all rounds (this machine is shared: the best of several
alternating runs is what repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = [("1 sequence", 1), ("2 sequences", 2), ("4 sequences", 4), ("8 sequences", 8)]
PREFILL = "prefill 8 x 32 tokens"


def measure(threads: int) -> dict[str, float]:
    """Milliseconds per decode for each shape, in this process (20th percentile of the repeats)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import llama_cpp as llama
    import numpy as np

    from bench.compare import smollm2_path
    from child.engine.llama_model import ContextSettings, LlamaModel, add_to_batch

    model = LlamaModel(smollm2_path(), ContextSettings(4096, 8, 512, 512, threads, threads, "auto", False))
    batch = llama.llama_batch_init(512, 0, 8)

    def timed(feeds: list[tuple[int, list[int]]], repeats: int) -> float:
        llama.llama_memory_clear(model.memory, True)
        times = []
        for r in range(repeats):
            n = 0
            for seq, tokens in feeds:
                n = add_to_batch(batch, n, seq, r * len(tokens), tokens, logits_for_last=True)
            batch.n_tokens = n
            started = time.perf_counter()
            assert llama.llama_decode(model.ctx, batch) == 0
            times.append(time.perf_counter() - started)
        return 1000 * float(np.percentile(times, 20))

    results = {name: timed([(s, [100 + s]) for s in range(n)], 80) for name, n in SHAPES}
    results[PREFILL] = timed([(s, list(range(200 + s, 232 + s))) for s in range(8)], 6)
    llama.llama_batch_free(batch)
    model.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline-libs", help="folder with another build's libggml*.so to compare against")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.threads)))
        return
    builds = {"this virtualenv": None}
    if args.baseline_libs:
        builds["baseline"] = str(Path(args.baseline_libs).resolve())
    best: dict[str, dict[str, float]] = {name: {} for name in builds}
    for _ in range(args.rounds):
        for name, libs in builds.items():
            env = dict(os.environ)
            if libs:
                env["LD_LIBRARY_PATH"] = libs
            out = subprocess.run([sys.executable, __file__, "--measure", "--threads", str(args.threads)],
                                 env=env, capture_output=True, text=True, check=True).stdout
            for shape, ms in json.loads(out.splitlines()[-1]).items():
                best[name][shape] = min(best[name].get(shape, float("inf")), ms)
    names = list(builds)
    print("| shape | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for shape in [name for name, _ in SHAPES] + [PREFILL]:
        print(f"| {shape} | " + " | ".join(f"{best[n][shape]:.2f} ms" for n in names) + " |")


if __name__ == "__main__":
    main()
