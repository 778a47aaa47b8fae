#!/usr/bin/env python3
"""Structured output: what a JSON schema costs, measured two ways on SmolLM2.

1. Through the child: 8 concurrent requests under a json_schema against 8 free ones (same
   prompts, same max_tokens), in alternating rounds; generated tokens per second of each. The
   schema asks for more than max_tokens holds and the free requests ignore the end of text, so
   both sides generate exactly max_tokens per request: the difference is the masking alone.
2. The grammar engines alone, per token, on the same token sequence (a JSON text that follows the
   schema): llguidance's mask (what the child uses) against libllama's grammar sampler with
   llama-cpp-python's JSON-schema-to-GBNF converter, both over the whole vocabulary. libllama's
   sampler is also timed the way llama.cpp's common sampler uses it: checking only the sampled
   token, the full pass only when it is rejected (the best case for it).

    python bench/constrained_decoding.py [--rounds 3] [--max-tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import llama_cpp as llama
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.compare import smollm2_path, wait_healthy  # noqa: E402
from child.engine.constraints import ConstraintCompiler, json_schema_grammar  # noqa: E402
from child.serving import free_port  # noqa: E402

CLIENTS = 8
SCHEMA = {
    "type": "object",
    "properties": {
        "people": {"type": "array", "minItems": 12, "maxItems": 16, "items": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
                           "city": {"type": "string", "maxLength": 24},
                           "role": {"type": "string", "enum": ["engineer", "teacher", "doctor", "artist"]}},
            "required": ["name", "age", "city", "role"], "additionalProperties": False}},
    },
    "required": ["people"], "additionalProperties": False,
}
PROMPTS = [f"Describe {what} in JSON: their names, ages, cities and jobs." for what in (
    "the people in a small office", "three friends", "a family", "four neighbours", "a team of doctors",
    "the staff of a school", "a band of artists", "some engineers")]
SAMPLE = {"people": [{"name": "Alice Martin", "age": 34, "city": "Lyon", "role": "engineer"},
                     {"name": "Bob Stone", "age": 41, "city": "Paris", "role": "teacher"},
                     {"name": "Chloe Durand", "age": 29, "city": "Nice", "role": "doctor"},
                     {"name": "David Brun", "age": 52, "city": "Lille", "role": "artist"}] * 3}


def one_round(url: str, constrained: bool, max_tokens: int) -> float:
    def ask(prompt: str) -> int:
        body: dict[str, object] = {"messages": [{"role": "user", "content": prompt}], "temperature": 0.7, "seed": 1,
                                   "max_tokens": max_tokens}
        if constrained:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "people", "schema": SCHEMA}}
        else:
            body["ignore_eos"] = True
        response = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
        response.raise_for_status()
        return int(response.json()["usage"]["completion_tokens"])

    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        tokens = sum(pool.map(ask, PROMPTS[:CLIENTS]))
    return tokens / (time.perf_counter() - started)


def through_the_child(args: argparse.Namespace, model: str) -> dict[str, float]:
    port = free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", "child", "-m", model, "--port", str(port), "-t",
                                 str(args.threads), "-np", str(CLIENTS), "-c", str(CLIENTS * 1024)],
                                stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc)
            one_round(url, True, 8)  # warm-up: llguidance's token trie is built on the first schema
            free, constrained = [], []
            for _ in range(args.rounds):
                free.append(one_round(url, False, args.max_tokens))
                constrained.append(one_round(url, True, args.max_tokens))
        finally:
            proc.terminate()
            proc.wait(30)
    return {"free_tok_s": statistics.median(free), "json_schema_tok_s": statistics.median(constrained),
            "ratio": statistics.median(c / f for c, f in zip(constrained, free, strict=True))}


def per_token_costs(model: str) -> dict[str, float]:
    compiler = ConstraintCompiler.for_model(model)
    params = llama.llama_model_default_params()
    params.vocab_only = True
    vocab_model = llama.llama_model_load_from_file(model.encode(), params)
    vocab = llama.llama_model_get_vocab(vocab_model)
    n_vocab = int(llama.llama_vocab_n_tokens(vocab))
    text = json.dumps(SAMPLE).encode()
    buffer = (llama.llama_token * 4096)()
    n = llama.llama_tokenize(vocab, text, len(text), buffer, 4096, False, False)
    tokens = list(buffer[:n])
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(n_vocab).astype(np.float32)

    grammar = compiler.compile(json_schema_grammar(SCHEMA), "the schema")
    constraint = grammar.start()
    started = time.perf_counter()
    for token in tokens:
        scratch = logits.copy()
        constraint.apply(scratch)
        assert np.isfinite(scratch[token]), "llguidance refused a token of the sample"
        constraint.accept(token)
    llguidance_us = (time.perf_counter() - started) / len(tokens) * 1e6

    from llama_cpp.llama_grammar import json_schema_to_gbnf

    gbnf = json_schema_to_gbnf(json.dumps(SCHEMA))
    data = (llama.llama_token_data * n_vocab)()
    array = llama.llama_token_data_array(data=data, size=n_vocab, selected=-1, sorted=False)

    def libllama_pass(full: bool) -> float:
        sampler = llama.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
        assert sampler, "libllama could not parse the converted grammar"
        started = time.perf_counter()
        for token in tokens:
            if full:
                for i in range(n_vocab):
                    data[i].id, data[i].logit, data[i].p = i, float(logits[i]), 0.0
                array.size = n_vocab
            else:  # the common sampler's fast path: only the sampled token is checked
                data[0].id, data[0].logit, data[0].p = token, 1.0, 0.0
                array.size = 1
            llama.llama_sampler_apply(sampler, ctypes.byref(array))
            assert data[0 if not full else token].logit != float("-inf"), "libllama refused a token of the sample"
            llama.llama_sampler_accept(sampler, token)
        elapsed = time.perf_counter() - started
        llama.llama_sampler_free(sampler)
        return elapsed / len(tokens) * 1e6

    # Filling the candidate array from Python costs time libllama's own C++ callers do not pay: it
    # is timed alone and taken off.
    started = time.perf_counter()
    for _ in tokens:
        for i in range(n_vocab):
            data[i].id, data[i].logit, data[i].p = i, float(logits[i]), 0.0
    fill_us = (time.perf_counter() - started) / len(tokens) * 1e6
    full_us = libllama_pass(True) - fill_us
    fast_us = libllama_pass(False)
    llama.llama_model_free(vocab_model)
    return {"tokens": len(tokens), "n_vocab": n_vocab, "llguidance_mask_us": llguidance_us,
            "libllama_grammar_full_us": full_us, "libllama_grammar_sampled_token_us": fast_us}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["child", "per-token"], default=None)
    args = parser.parse_args()
    model = smollm2_path()
    results: dict[str, object] = {}
    if args.only in (None, "per-token"):
        results["per_token"] = per_token_costs(model)
        print(json.dumps(results["per_token"], indent=1), flush=True)
    if args.only in (None, "child"):
        results["child"] = through_the_child(args, model)
        print(json.dumps(results["child"], indent=1), flush=True)


if __name__ == "__main__":
    main()
