"""Tool calls: reading each family's calls out of an answer, and each family end to end through a
child whose chat template knows tools (the tiny model: its text is noise, so every call it makes
comes from the grammar that forces one)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from child.tool_calls import (
    ToolUse,
    family_of,
    first_call_marker,
    might_start_a_call,
    parse_calls,
    parse_tools,
    partial_call_marker,
)

LIGHTS = {"type": "function", "function": {
    "name": "set_lights", "description": "Switch the lights of a room",
    "parameters": {"type": "object", "properties": {
        "room": {"type": "string", "enum": ["kitchen", "hall", "study"]}, "on": {"type": "boolean"}},
        "required": ["room", "on"]}}}
ALARM = {"type": "function", "function": {
    "name": "arm_alarm", "parameters": {"type": "object", "properties": {
        "mode": {"type": "string", "enum": ["away", "night"]}}, "required": ["mode"]}}}


def _use(choice: Any = "auto", parallel: bool = False) -> ToolUse:
    use = parse_tools([LIGHTS, ALARM], choice, parallel)
    assert use is not None
    return use


CALL = {"name": "set_lights", "arguments": {"room": "hall", "on": True}}


@pytest.mark.parametrize(("family", "text"), [
    ("hermes", f"<tool_call>\n{json.dumps(CALL)}\n</tool_call>"),
    ("hermes", f"Sure.\n<tool_call>{json.dumps(CALL)}</tool_call>"),
    ("hermes", f"<tool_call>{json.dumps(CALL)}"),  # the end tag left out, as small models do
    ("llama3", json.dumps({"name": "set_lights", "parameters": CALL["arguments"]})),
    ("llama3", "<|python_tag|>" + json.dumps({"name": "set_lights", "parameters": CALL["arguments"]})),
    ("mistral", "[TOOL_CALLS]" + json.dumps([CALL])),
    ("mistral", "[TOOL_CALLS] " + json.dumps(CALL)),
    ("hermes", json.dumps(CALL)),  # the plain-JSON fallback, whatever the family
    ("hermes", json.dumps({"type": "function", "function": {"name": "set_lights",
                                                            "arguments": json.dumps(CALL["arguments"])}})),
])
def test_tool_calls_each_family_parses(family: Any, text: str) -> None:
    content, calls = parse_calls(text, _use(), family)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("set_lights", CALL["arguments"])]
    assert content in ("", "Sure.")
    assert calls[0].id.startswith("call_") and len(calls[0].id) == 29


def test_tool_calls_parallel_keeps_every_call_else_the_first() -> None:
    second = {"name": "arm_alarm", "arguments": {"mode": "night"}}
    text = f"<tool_call>{json.dumps(CALL)}</tool_call>\n<tool_call>{json.dumps(second)}</tool_call>"
    _, both = parse_calls(text, _use(parallel=True), "hermes")
    assert [c.name for c in both] == ["set_lights", "arm_alarm"]
    _, one = parse_calls(text, _use(parallel=False), "hermes")
    assert [c.name for c in one] == ["set_lights"]
    assert len({c.id for c in both}) == 2


def test_tool_calls_a_call_cut_by_max_tokens_leaves_the_complete_ones() -> None:
    second = {"name": "arm_alarm", "arguments": {"mode": "night"}}
    text = (f"<tool_call>\n{json.dumps(CALL)}\n</tool_call>\n<tool_call>\n{json.dumps(second)}\n</tool_call>\n"
            '<tool_call>\n{"name": "set_lights", "arguments": {"ro')
    content, calls = parse_calls(text, _use(parallel=True), "hermes")
    assert [c.name for c in calls] == ["set_lights", "arm_alarm"] and content == ""


@pytest.mark.parametrize("text", [
    "The lights are on.",
    "<tool_call>{\"name\": \"open_door\", \"arguments\": {}}</tool_call>",  # a tool that was not offered
    "<tool_call>{not json}</tool_call>",
    "[1, 2, 3]",
    "{\"room\": \"hall\"}",  # JSON, but no call
])
def test_tool_calls_what_is_no_call_stays_text(text: str) -> None:
    content, calls = parse_calls(text, _use(), "hermes")
    assert calls == [] and content == text


def test_tool_calls_a_named_choice_only_accepts_that_tool() -> None:
    use = _use({"type": "function", "function": {"name": "arm_alarm"}})
    assert [t.name for t in use.offered] == ["arm_alarm"] and use.forced
    assert parse_calls(f"<tool_call>{json.dumps(CALL)}</tool_call>", use, "hermes")[1] == []


def test_tool_calls_stream_holds_back_what_could_become_a_call() -> None:
    assert might_start_a_call("") and might_start_a_call("<tool") and might_start_a_call("{\"na")
    assert might_start_a_call("[TOOL_") and not might_start_a_call("Hello")
    assert first_call_marker("text <tool_call>{") == 5 and first_call_marker("no call") == -1
    assert partial_call_marker("text <tool_") == len("<tool_") and partial_call_marker("text") == 0


def test_tool_calls_family_comes_from_the_template() -> None:
    assert family_of("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert family_of("{{ '<|python_tag|>' }}") == "llama3"
    assert family_of("{% if tools %}<tools>{% endif %}") == "hermes"
    assert family_of(None) == "hermes"


# -- end to end, one template per family -----------------------------------------------------------

HERMES_TEMPLATE = """{%- if tools %}<|system|>You may call these tools:
<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>
Answer with <tool_call>{"name": ..., "arguments": ...}</tool_call>.
{% endif %}
{%- for m in messages %}
{%- if m.role == 'tool' %}<|user|><tool_response>{{ m.content }}</tool_response>
{% elif m.tool_calls %}<|assistant|>
{%- for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}
{% else %}<|{{ m.role }}|>{{ m.content }}
{% endif %}{%- endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"""

LLAMA3_TEMPLATE = """{%- for m in messages %}<|{{ m.role }}|>{{ m.content }}
{% endfor %}{%- if tools %}<|ipython|>Call a function as {"name": ..., "parameters": ...} or <|python_tag|>.
{% for tool in tools %}{{ tool | tojson }}{% endfor %}{% endif %}
{%- if add_generation_prompt %}<|assistant|>{% endif %}"""

MISTRAL_TEMPLATE = """{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}
{%- for m in messages %}{% if m.tool_calls %}[TOOL_CALLS]{{ m.tool_calls | tojson }}
{% else %}[{{ m.role }}]{{ m.content }}
{% endif %}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"""


@pytest.mark.parametrize(("template", "family_marker"), [
    (HERMES_TEMPLATE, "<tools>"), (LLAMA3_TEMPLATE, "<|ipython|>"), (MISTRAL_TEMPLATE, "[AVAILABLE_TOOLS]"),
], ids=["hermes", "llama3", "mistral"])
def test_tool_calls_families_end_to_end(start_child, tiny_model: Path, tmp_path: Path, template: str,
                                        family_marker: str) -> None:
    template_file = tmp_path / "template.jinja"
    template_file.write_text(template)
    child = start_child(tiny_model, "-c", "2048", "-np", "2", "-t", "1", "--chat-template-file", str(template_file))
    ask = [{"role": "user", "content": "Lights on in the hall"}]
    # The template's own rendering of the tools, not the generic prompt.
    prompt = child.client.post("/apply-template", json={"messages": ask, "tools": [LIGHTS, ALARM]}).json()["prompt"]
    assert family_marker in prompt and "set_lights" in prompt and "You can call functions" not in prompt
    for tool_choice in ("required", {"type": "function", "function": {"name": "arm_alarm"}}):
        body = {"messages": ask, "tools": [LIGHTS, ALARM], "tool_choice": tool_choice, "temperature": 0,
                "max_tokens": 200}
        answer = child.client.post("/v1/chat/completions", json=body).json()["choices"][0]
        assert answer["finish_reason"] == "tool_calls", answer
        call = answer["message"]["tool_calls"][0]
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (LIGHTS, ALARM)}
        jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
        if isinstance(tool_choice, dict):
            assert call["function"]["name"] == "arm_alarm"
        streamed = _streamed_call(child.client, body)
        assert (streamed["name"], json.loads(streamed["arguments"])) == \
            (call["function"]["name"], json.loads(call["function"]["arguments"]))
    # The call goes back into the history and renders through the template.
    history = [*ask, answer["message"], {"role": "tool", "tool_call_id": call["id"], "content": "done"}]
    again = child.client.post("/v1/chat/completions", json={"messages": history, "tools": [LIGHTS, ALARM],
                                                             "max_tokens": 8})
    assert again.status_code == 200, again.text


def _streamed_call(client: Any, body: dict[str, Any]) -> dict[str, str]:
    call = {"name": "", "arguments": ""}
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:])["choices"]:
                for piece in choice["delta"].get("tool_calls") or []:
                    call["name"] += piece.get("function", {}).get("name") or ""
                    call["arguments"] += piece.get("function", {}).get("arguments") or ""
    return call
