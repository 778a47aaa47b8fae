"""The child's engine: batching correctness, seeds, cancellation, queueing, sleep and wake."""

from __future__ import annotations

import concurrent.futures
import ctypes
import re
import time
from pathlib import Path

import httpx
import llama_cpp as llama
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from child.engine.llama_model import ContextSettings, LlamaModel, add_to_batch
from conftest import EventFeed, tiny_preset
from tiny_model import write_tiny_model

PROMPTS = [
    "What is the capital of France?", "Name three colours.", "Count from one to five.",
    "What is two plus two?", "Say hello in Spanish.", "What is the largest planet?",
    "Give me a word that rhymes with cat.", "What do bees make?",
]


def _greedy(client: httpx.Client, prompt: str) -> str:
    response = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 48})
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def test_engine_full_batch_gives_the_same_text_as_alone(start_child, smollm2_model: Path) -> None:
    child = start_child(smollm2_model, "-np", "8", "-c", "4096", "-t", "2")
    alone = [_greedy(child.client, p) for p in PROMPTS]
    decodes_before = child.metric("llamacpp:n_decode_total")
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: _greedy(child.client, p), PROMPTS))
    assert together == alone
    # They really shared decode steps: far fewer decodes than tokens generated.
    per_decode = child.metric("llamacpp:n_busy_slots_per_decode")
    assert per_decode > 1.0
    assert child.metric("llamacpp:n_decode_total") - decodes_before < sum(48 for _ in PROMPTS)


def test_engine_same_seed_same_text(start_child, smollm2_model: Path) -> None:
    child = start_child(smollm2_model, "-np", "2", "-c", "1024", "-t", "2")

    def sample(seed: int) -> str:
        body = {"messages": [{"role": "user", "content": "Write a short poem about the sea."}],
                "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": seed, "max_tokens": 32}
        return str(child.client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"])

    first, again = sample(42), sample(42)
    assert first == again
    assert len({sample(s) for s in (1, 2, 3)} | {first}) > 1


def test_engine_metrics_parse_and_count_tokens(start_child, tiny_model: Path) -> None:
    child = start_child(tiny_model, "-np", "2", "-c", "1024", "-t", "1")
    child.client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 7, "ignore_eos": True})
    families = {f.name: f for f in text_string_to_metric_families(child.client.get("/metrics").text)}
    assert families["llamacpp:tokens_predicted"].samples[0].value == 7
    assert families["llamacpp:prompt_tokens"].samples[0].value > 0
    assert families["modelyard:slots_total"].samples[0].value == 2
    assert families["modelyard:kv_cells_used"].samples[0].value > 0
    assert families["modelyard:is_sleeping"].samples[0].value == 0


def test_engine_client_disconnect_frees_the_slot(start_child, smollm2_model: Path) -> None:
    # SmolLM2 (about 100 tokens/s here) so that 2000 tokens outlast the test by far.
    child = start_child(smollm2_model, "-np", "1", "-c", "2048", "-t", "2")
    body = {"prompt": "hello", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with child.client.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()  # keep a reference: a collected iterator closes the stream
        next(line for line in lines if line.startswith("data: "))
        assert child.metric("modelyard:slots_busy") == 1
    child.wait_metric("modelyard:slots_busy", 0)
    generated = child.metric("llamacpp:tokens_predicted_total")
    assert generated < 2000
    assert "cancelled: slot 0 freed" in "".join(child.log)


def test_engine_full_queue_answers_503_with_retry_after(start_child, smollm2_model: Path) -> None:
    child = start_child(smollm2_model, "-np", "1", "-c", "2048", "-t", "2", "--max-queue", "1")
    long_body = {"prompt": "hello", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with child.client.stream("POST", "/v1/completions", json=long_body) as first:
        lines = first.iter_lines()  # keep a reference: a collected iterator closes the stream
        next(line for line in lines if line.startswith("data: "))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            queued = pool.submit(child.client.post, "/v1/completions",
                                 json={"prompt": "hi", "max_tokens": 2})
            child.wait_metric("llamacpp:requests_deferred", 1)
            refused = child.client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "unavailable_error"
            first.close()  # frees the slot: the queued request runs
            assert queued.result(60).status_code == 200


def test_engine_sleeps_when_idle_and_wakes_through_the_router(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny"], extra="sleep-idle-seconds = 0.5\n"))
    feed = EventFeed(router.url)
    try:
        first = router.client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3,
                                                            "temperature": 0, "ignore_eos": True})
        assert first.status_code == 200
        feed.wait_for(lambda e: e["data"].get("status") == "sleeping")
        assert router.status("tiny") == "sleeping"
        assert router.client.get("/metrics", params={"model": "tiny", "autoload": "false"}).status_code == 200
        # A metrics scrape never wakes the model: it is still asleep afterwards (a child that woke
        # would have said so by now).
        time.sleep(0.3)
        assert router.status("tiny") == "sleeping"
        again = router.client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3,
                                                            "temperature": 0, "ignore_eos": True})
        assert again.status_code == 200
        # The same greedy text before and after the model was released and loaded again.
        assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
        woke = feed.wait_for(lambda e: e["data"].get("status") == "loaded" and "info" not in e["data"])
        assert woke["event"] == "status_change"
        assert re.search(r"model tiny sleeping->loaded", router.log_text())
    finally:
        feed.close()


def test_engine_reuses_the_prompt_prefix_of_the_previous_request(start_child, tiny_model: Path) -> None:
    child = start_child(tiny_model, "-np", "1", "-c", "1024", "-t", "1")
    body = {"prompt": "the capital of France is Paris and the capital", "max_tokens": 4, "temperature": 0,
            "ignore_eos": True}
    first = child.client.post("/v1/completions", json=body).json()
    second = child.client.post("/v1/completions", json=body).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == first["usage"]["prompt_tokens"] - 1  # all but the last token, which must be fed again
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    assert second["timings"]["prompt_n"] == 1
    uncached = child.client.post("/v1/completions", json={**body, "cache_prompt": False}).json()
    assert uncached["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert uncached["choices"][0]["text"] == first["choices"][0]["text"]


def test_engine_penalties_and_logit_bias_are_applied(start_child, tiny_model: Path) -> None:
    child = start_child(tiny_model, "-np", "2", "-c", "1024", "-t", "1")
    base = {"prompt": "hello world", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    plain = child.client.post("/v1/completions", json=base).json()
    penalised = child.client.post("/v1/completions", json={
        **base, "repeat_penalty": 1.5, "presence_penalty": 1.5, "frequency_penalty": 1.5}).json()
    assert penalised["usage"]["completion_tokens"] == 12
    assert penalised["choices"][0]["text"] != plain["choices"][0]["text"]
    forced = child.client.post("/v1/completions", json={**base, "logit_bias": {"300": 100.0}}).json()
    text = forced["choices"][0]["text"]
    assert text and len(set(text.strip())) == 1, text  # token 300 ("p") every time
    # The engine is still healthy for everyone after all of that.
    assert child.client.post("/v1/completions", json=base).json()["choices"][0]["text"] == plain["choices"][0]["text"]


def _greedy_logits(model: LlamaModel, prompts: list[list[int]], steps: int) -> list[list[np.ndarray]]:
    """Prefill all prompts in one batch (one sequence each), then decode `steps` greedy tokens for
    all of them, one batch per step; returns each sequence's logits after every decode."""
    llama.llama_memory_clear(model.memory, True)
    batch = llama.llama_batch_init(512, 0, len(prompts))
    logits: list[list[np.ndarray]] = [[] for _ in prompts]
    feeds = [list(p) for p in prompts]
    positions = [0] * len(prompts)
    try:
        for _ in range(steps + 1):
            n = 0
            last: list[int] = []  # batch index of each sequence's last token
            for seq, tokens in enumerate(feeds):
                n = add_to_batch(batch, n, seq, positions[seq], tokens, logits_for_last=True)
                last.append(n - 1)
                positions[seq] += len(tokens)
            batch.n_tokens = n
            assert llama.llama_decode(model.ctx, batch) == 0
            for seq in range(len(prompts)):
                row = np.ctypeslib.as_array(llama.llama_get_logits_ith(model.ctx, last[seq]), shape=(model.n_vocab,))
                logits[seq].append(row.copy())
                feeds[seq] = [int(row.argmax())]
    finally:
        llama.llama_batch_free(batch)
    return logits


def test_q4_1_products_give_the_same_logits_in_any_batch(tmp_path: Path) -> None:
    # SmolLM2's file is Q4_1. `make install` builds libllama with modelyard's tiled Q4_1 kernel for
    # products over several tokens (patches/llama-cpp-python); a single token takes ggml's own
    # dot product. A sequence must get the very same logits either way, at every batch width
    # (widths 2, 3, 5 and the 331-row output matrix reach the kernel's partial tiles).
    # On an upstream build the comparison would hold trivially: the kernel must be there.
    libggml_cpu = ctypes.CDLL(str(Path(llama.__file__).parent / "lib" / "libggml-cpu.so"))
    assert hasattr(libggml_cpu, "ggml_gemm_q4_1_q8_1"), "libllama was built without modelyard's Q4_1 kernel"
    model = LlamaModel(str(write_tiny_model(tmp_path / "q4_1.gguf", weight_type="q4_1")),
                       ContextSettings(n_ctx=8 * 64, n_parallel=8, n_batch=512, n_ubatch=512, n_threads=2,
                                       n_threads_batch=2, flash_attn="auto", kv_unified=False))
    try:
        rng = np.random.default_rng(7)
        prompts = [[1, *map(int, rng.integers(3, model.n_vocab, size=5))] for _ in range(8)]
        alone = [_greedy_logits(model, [prompt], steps=6)[0] for prompt in prompts]
        for width in (2, 3, 5, 8):
            together = _greedy_logits(model, prompts[:width], steps=6)
            for seq in range(width):
                for step, (got, want) in enumerate(zip(together[seq], alone[seq], strict=True)):
                    assert np.array_equal(got, want), (
                        f"batch of {width}, sequence {seq}, step {step}: logits differ by up to "
                        f"{np.abs(got - want).max()}")
    finally:
        model.close()
