"""Random sampling parameters against a real child: every combination answers, none kills the engine."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SAMPLING = st.fixed_dictionaries({}, optional={
    "temperature": st.sampled_from([0, 0.1, 1.0, 2.0, 5.0]),
    "top_k": st.sampled_from([0, 1, 5, 100000]),
    "top_p": st.sampled_from([0.0, 0.1, 0.9, 1.0]),
    "min_p": st.sampled_from([0.0, 0.5, 1.0]),
    "seed": st.sampled_from([-1, 0, 42, 2**40]),
    "repeat_penalty": st.sampled_from([0.01, 1.0, 2.0]),
    "repeat_last_n": st.sampled_from([-1, 0, 64]),
    "presence_penalty": st.sampled_from([-2.0, 0.0, 2.0]),
    "frequency_penalty": st.sampled_from([-2.0, 0.0, 2.0]),
    "stop": st.sampled_from(["a", ["x", "yy"], [], ""]),
    "logit_bias": st.dictionaries(st.integers(0, 300).map(str), st.sampled_from([-100.0, 5.0, 100.0]), max_size=3),
    "ignore_eos": st.booleans(),
    "max_tokens": st.sampled_from([1, 5, 20]),
    "stream": st.booleans(),
})
PROMPTS = st.sampled_from(["hi", "a b c", "x" * 50, [5, 6, 7]])


def test_engine_fuzz_random_sampling_never_fails(start_child, tiny_model: Path) -> None:
    child = start_child(tiny_model, "-np", "2", "-c", "1024", "-t", "1")
    answered = 0

    @given(params=SAMPLING, prompt=PROMPTS, chat=st.booleans())
    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def one(params: dict, prompt: str | list[int], chat: bool) -> None:
        nonlocal answered
        if chat:
            body = {**params, "messages": [{"role": "user", "content": str(prompt)}]}
            response = child.client.post("/v1/chat/completions", json=body)
        else:
            response = child.client.post("/v1/completions", json={**params, "prompt": prompt})
        assert response.status_code == 200, (params, response.text)
        if params.get("stream"):
            assert response.text.rstrip().endswith("data: [DONE]"), response.text[-300:]
        answered += 1

    one()
    assert answered >= 100
    assert child.client.get("/health").status_code == 200
    print(f"\n[reliability] engine fuzz: {answered} random sampling combinations, all answered")
