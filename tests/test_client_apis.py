"""The two other client APIs the child serves on its chat machinery, through the router on SmolLM2
with the vendors' SDKs unmodified: Anthropic's Messages API (/v1/messages, count_tokens) and
OpenAI's Responses API (/v1/responses); and a 400 naming what they cannot honour."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest
from openai import BadRequestError, OpenAI

from conftest import RouterProcess, smollm2_router

GREEDY = {"temperature": 0}  # anthropic 2.12's create() has no sampling arguments: sent as extra_body
ASK = "What is the weather like in Paris today?"
WEATHER_SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 40}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"]}
ANTHROPIC_TOOL = {"name": "get_weather", "description": "The current weather in a city", "input_schema": WEATHER_SCHEMA}
RESPONSES_TOOL = {"type": "function", "name": "get_weather", "description": "The current weather in a city",
                  "parameters": WEATHER_SCHEMA}


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory, smollm2_model: Path) -> Iterator[RouterProcess]:
    with smollm2_router(tmp_path_factory.mktemp("client-apis"), smollm2_model, "c = 4096\nnp = 2\nt = 2") as process:
        yield process


@pytest.fixture(scope="module")
def claude(router: RouterProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=router.url, api_key="unused", timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def openai_client(router: RouterProcess) -> OpenAI:
    return OpenAI(base_url=router.url + "/v1", api_key="unused", timeout=300, max_retries=0)


def chat_text(router: RouterProcess, messages: list[dict[str, Any]], max_tokens: int) -> str:
    """The chat route's greedy answer to the same conversation."""
    response = router.client.post("/v1/chat/completions", json={
        "model": "smollm2", "messages": messages, "max_tokens": max_tokens, **GREEDY}, timeout=300)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def sse_events(router: RouterProcess, path: str, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of every event of a streamed answer, in order."""
    events = []
    with router.client.stream("POST", path, json={"model": "smollm2", "stream": True, **body}, timeout=300) as stream:
        assert stream.status_code == 200, stream.read()
        name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                assert name is not None, line
                events.append((name, json.loads(line[6:])))
                name = None
    return events


# -- Anthropic's Messages API -----------------------------------------------------------------------

def test_messages_create_answers_what_the_chat_route_answers(router: RouterProcess,
                                                              claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model="smollm2", max_tokens=24, system="You are a helpful assistant.",
                                     messages=[{"role": "user", "content": "Name a colour."}], extra_body=GREEDY)
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == "smollm2"
    assert [block.type for block in message.content] == ["text"]
    text = message.content[0].text
    # The same conversation as a chat completion: the translation made the same prompt.
    assert text == chat_text(router, [{"role": "system", "content": "You are a helpful assistant."},
                                      {"role": "user", "content": "Name a colour."}], 24)
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert 1 <= message.usage.output_tokens <= 24
    assert (message.stop_reason == "max_tokens") == (message.usage.output_tokens == 24)


def test_messages_stream_events_and_final_message(router: RouterProcess, claude: anthropic.Anthropic) -> None:
    ask = [{"role": "user", "content": [{"type": "text", "text": "Write one sentence about the sea."}]}]
    whole = claude.messages.create(model="smollm2", max_tokens=30, messages=ask, extra_body=GREEDY)
    with claude.messages.stream(model="smollm2", max_tokens=30, messages=ask, extra_body=GREEDY) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1  # streamed, not sent at once
    assert "".join(pieces) == final.content[0].text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens

    events = sse_events(router, "/v1/messages", {"max_tokens": 5, "messages": ask, **GREEDY})
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert all(name == data["type"] for name, data in events)
    assert events[0][1]["message"]["usage"]["input_tokens"] == whole.usage.input_tokens
    assert events[-2][1] == {"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                             "usage": {"output_tokens": 5}}


def test_messages_forced_tool_use_round_trip(router: RouterProcess, claude: anthropic.Anthropic) -> None:
    ask = [{"role": "user", "content": ASK}]
    message = claude.messages.create(model="smollm2", max_tokens=200, messages=ask, tools=[ANTHROPIC_TOOL],
                                     tool_choice={"type": "any"}, extra_body=GREEDY)
    assert message.stop_reason == "tool_use"
    uses = [block for block in message.content if block.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather" and uses[0].id.startswith("toolu_")
    jsonschema.validate(uses[0].input, WEATHER_SCHEMA)

    # Streamed, a named tool: the same call, its input sent as input_json_delta.
    with claude.messages.stream(model="smollm2", max_tokens=200, messages=ask, tools=[ANTHROPIC_TOOL],
                                tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY) as stream:
        deltas = [event.delta.type for event in stream if event.type == "content_block_delta"]
        streamed = stream.get_final_message()
    assert deltas == ["input_json_delta"]
    assert streamed.stop_reason == "tool_use"
    assert [(b.type, b.input) for b in streamed.content] == [("tool_use", uses[0].input)]

    # The result goes back as a tool_result block: the model answers in text, having read it.
    history: list[Any] = [*ask, {"role": "assistant", "content": message.content},
                          {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                                        "content": "sunny, 24 degrees"}]}]
    answer = claude.messages.create(model="smollm2", max_tokens=60, messages=history, tools=[ANTHROPIC_TOOL],
                                    extra_body=GREEDY)
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert [block.type for block in answer.content] == ["text"]
    assert answer.content[0].text.strip()
    # The result was in the prompt: it is longer than the question and the call alone.
    counted = claude.messages.count_tokens(model="smollm2", messages=history, tools=[ANTHROPIC_TOOL])
    assert counted.input_tokens == answer.usage.input_tokens > message.usage.input_tokens


def test_messages_count_tokens_is_the_prompt_the_answer_reports(claude: anthropic.Anthropic) -> None:
    conversations: list[dict[str, Any]] = [
        {"messages": [{"role": "user", "content": "Hello there."}]},
        {"system": [{"type": "text", "text": "Answer in French."}],
         "messages": [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Bonjour."},
                      {"role": "user", "content": "How are you?"}]},
        {"messages": [{"role": "user", "content": ASK}], "tools": [ANTHROPIC_TOOL]},
    ]
    counts = []
    for conversation in conversations:
        counted = claude.messages.count_tokens(model="smollm2", **conversation).input_tokens
        answered = claude.messages.create(model="smollm2", max_tokens=1, **conversation).usage.input_tokens
        assert counted == answered, conversation
        counts.append(counted)
    assert counts[0] < counts[1] < counts[2]  # the tools' description is part of the prompt


def test_messages_stop_sequence_is_reported(claude: anthropic.Anthropic) -> None:
    ask = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    free = claude.messages.create(model="smollm2", max_tokens=40, messages=ask, extra_body=GREEDY)
    text = free.content[0].text
    assert "5" in text, text
    stopped = claude.messages.create(model="smollm2", max_tokens=40, messages=ask, stop_sequences=["5"],
                                     extra_body=GREEDY)
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "5"
    assert stopped.content[0].text == text[:text.index("5")]


USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("body", "message"), [
    ({"messages": USER}, "'max_tokens' is required"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]},
     "'messages[0].content[1]' is an 'image' block: this model reads text only"),
    ({"max_tokens": "eight", "messages": USER}, "max_tokens"),
    ({"max_tokens": 0, "messages": USER}, "max_tokens"),
    ({"max_tokens": 8, "messages": "hi"}, "messages"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": 5}]},
     "'messages[0].content' must be a string or a list of content blocks"),
    ({"max_tokens": 8, "messages": [{"role": "system", "content": "hi"}]}, "'messages[0].role' must be"),
    ({"max_tokens": 8, "messages": USER, "temperature": "hot"}, "temperature"),
    ({"max_tokens": 8, "messages": USER, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
     "'tools[0]' is the server tool 'web_search_20250305'"),
    ({"max_tokens": 8, "messages": USER, "tools": [ANTHROPIC_TOOL], "tool_choice": {"type": "tool", "name": "nope"}},
     "'tool_choice' names the function 'nope', which is not in 'tools'"),
    ({"max_tokens": 8, "messages": USER, "thinking": {"type": "enabled", "budget_tokens": 1024}}, "'thinking'"),
    ({"max_tokens": 8, "messages": USER, "frobnicate": True}, "'frobnicate' is not supported"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f",
                                                                   "input": {}}]}]},
     "'messages[0].content[0]' is a 'tool_use' block, which a 'user' message cannot hold"),
], ids=["no-max-tokens", "image", "max-tokens-string", "max-tokens-zero", "messages-string", "content-number",
        "system-role", "temperature-string", "server-tool", "unknown-tool-choice", "thinking", "unknown-field",
        "tool-use-from-user"])
def test_messages_bad_requests_are_400s_in_anthropic_shape(router: RouterProcess, body: dict[str, Any],
                                                           message: str) -> None:
    response = router.client.post("/v1/messages", json={"model": "smollm2", **body})
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error", error
    assert message in error["error"]["message"], error
    assert set(error) == {"type", "error"} and set(error["error"]) == {"type", "message"}


def test_messages_sdk_sees_a_400_as_bad_request(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match="reads text only") as caught:
        claude.messages.count_tokens(model="smollm2", messages=[{"role": "user", "content": [
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}]}])
    assert caught.value.status_code == 400


# -- OpenAI's Responses API -------------------------------------------------------------------------------

def test_responses_create_answers_what_the_chat_route_answers(router: RouterProcess, openai_client: OpenAI) -> None:
    response = openai_client.responses.create(model="smollm2", instructions="Be brief.", input="Name a fruit.",
                                              max_output_tokens=24, temperature=0)
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.output_text == chat_text(router, [{"role": "system", "content": "Be brief."},
                                                      {"role": "user", "content": "Name a fruit."}], 24)
    assert [item.type for item in response.output] == ["message"]
    assert response.usage is not None and 1 <= response.usage.output_tokens <= 24
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    if response.usage.output_tokens == 24:
        assert response.status == "incomplete" and response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens"
    else:
        assert response.status == "completed" and response.incomplete_details is None


def test_responses_stream_deltas_make_the_final_text(openai_client: OpenAI) -> None:
    ask = [{"role": "user", "content": [{"type": "input_text", "text": "Write one sentence about the sea."}]}]
    whole = openai_client.responses.create(model="smollm2", input=ask, max_output_tokens=200, temperature=0)
    events = list(openai_client.responses.create(model="smollm2", input=ask, max_output_tokens=200, temperature=0,
                                                 stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and set(kinds[4:-4]) == {"response.output_text.delta"}
    final = events[-1].response
    assert "".join(deltas) == final.output_text == whole.output_text
    assert final.status == whole.status == "completed"
    assert final.usage is not None and whole.usage is not None
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_responses_required_function_call_and_its_output(openai_client: OpenAI) -> None:
    response = openai_client.responses.create(model="smollm2", input=ASK, tools=[RESPONSES_TOOL],
                                              tool_choice="required", max_output_tokens=200, temperature=0)
    assert response.status == "completed"
    assert [item.type for item in response.output] == ["function_call"]
    call = response.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER_SCHEMA)

    streamed = list(openai_client.responses.create(model="smollm2", input=ASK, tools=[RESPONSES_TOOL],
                                                   tool_choice={"type": "function", "name": "get_weather"},
                                                   max_output_tokens=200, temperature=0, stream=True))
    arguments = "".join(e.delta for e in streamed if e.type == "response.function_call_arguments.delta")
    assert json.loads(arguments) == json.loads(call.arguments)
    assert not [e for e in streamed if e.type == "response.output_text.delta"]

    history: list[Any] = [{"role": "user", "content": ASK}, call.model_dump(exclude_none=True),
                          {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 24 degrees"}]
    answer = openai_client.responses.create(model="smollm2", input=history, tools=[RESPONSES_TOOL],
                                            max_output_tokens=60, temperature=0)
    assert [item.type for item in answer.output] == ["message"] and answer.output_text.strip()
    assert answer.usage is not None and response.usage is not None
    assert answer.usage.input_tokens > response.usage.input_tokens


@pytest.mark.parametrize(("body", "message"), [
    ({"previous_response_id": "resp_123"}, "'previous_response_id' is not supported: this server stores no responses"),
    ({"store": True}, "'store' is not supported"),
    ({"background": True}, "'background' is not supported"),
    ({"tools": [{"type": "web_search"}]}, "'tools[0]' is the built-in tool 'web_search'"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}]},
     "'input[0].content[0]' is 'input_image': this model reads text only"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "'input[0]' has type 'reasoning'"),
    ({"max_output_tokens": "many"}, "max_output_tokens"),
])
def test_responses_what_cannot_be_honoured_is_a_400_naming_it(router: RouterProcess, body: dict[str, Any],
                                                              message: str) -> None:
    response = router.client.post("/v1/responses", json={"model": "smollm2", "input": "hi", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and message in error["message"], error


def test_responses_sdk_sees_previous_response_id_as_bad_request(openai_client: OpenAI) -> None:
    with pytest.raises(BadRequestError, match="previous_response_id"):
        openai_client.responses.create(model="smollm2", input="hi", previous_response_id="resp_123")


# -- both ---------------------------------------------------------------------------------------------------

LONG = [{"role": "user", "content": "Write a long story about a dragon."}]


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize(("path", "body"), [
    ("/v1/messages", {"max_tokens": 2000, "messages": LONG}),
    ("/v1/responses", {"max_output_tokens": 2000, "input": LONG}),
], ids=["messages", "responses"])
def test_client_apis_a_client_that_leaves_frees_its_slot(router: RouterProcess, path: str, body: dict[str, Any],
                                                         stream: bool) -> None:
    def busy() -> bool:
        slots = router.client.get("/slots", params={"model": "smollm2"}).json()
        return any(slot["is_processing"] for slot in slots)

    def wait_until(condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.02)

    body = {"model": "smollm2", "stream": stream, **body, **GREEDY}
    if stream:
        with router.client.stream("POST", path, json=body, timeout=60) as response:
            lines = response.iter_lines()
            deltas = (line for line in lines if line.startswith("data: ") and "delta" in line)
            for _ in range(5):
                next(deltas)
            assert busy()
    else:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            leaving = pool.submit(httpx.post, router.url + path, json=body, timeout=httpx.Timeout(60, read=3))
            wait_until(busy, "the request never started")
            with pytest.raises(httpx.ReadTimeout):
                leaving.result(30)
    wait_until(lambda: not busy(), "the slot kept generating for a client that left")
