"""Tool calls: the tools a request offers, how the prompt presents them, how the model's answer
becomes OpenAI `tool_calls`, and the grammar that makes a call certain.

- The prompt. A chat template that knows tools (it mentions `tools`) gets them as the `tools`
  variable, with assistant messages carrying `tool_calls` and `tool` messages as they are, the way
  Hugging Face's templates expect. A template that does not (SmolLM2's) gets a generic prompt: a
  system message listing the tools and asking for Hermes-style calls, earlier calls written in
  that style, and tool results as `<tool_response>` user messages. The log says which.
- The call format ("family"), read from the template: Hermes / Qwen `<tool_call>{json}</tool_call>`,
  Llama 3.x (`<|python_tag|>` or a bare `{"name": ..., "parameters": ...}`), Mistral
  `[TOOL_CALLS][...]`; the generic prompt uses Hermes'. Parsing tries the family's format, then
  every other one, then a plain JSON object or list of calls.
- `tool_choice: "required"` or a named function: a grammar (llguidance Lark with the tools' JSON
  schemas inline) allows only calls in the family's format, to the allowed tools, with arguments
  that validate against each tool's `parameters`. `"none"`: the tools are not shown at all.
- `parallel_tool_calls` is false unless the request sets it (llama-server's default; OpenAI's is
  true): one call per answer, or up to MAX_PARALLEL_CALLS.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Literal

from child.engine.constraints import inline_json

Family = Literal["hermes", "llama3", "mistral"]
MAX_PARALLEL_CALLS = 8  # with parallel_tool_calls: a bound on the calls one answer may make
MAX_TOOLS = 128  # per request, as OpenAI's API

_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_ID_CHARS = string.ascii_letters + string.digits


class ToolError(ValueError):
    """The request's tools or tool_choice cannot be honoured; the message names the field."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24)))

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolUse:
    """What a request asked for: the tools it offers and how they must be used."""

    tools: tuple[Tool, ...]
    choice: Literal["auto", "none", "required"] | str  # or the name of the one function to call
    parallel: bool

    @property
    def offered(self) -> tuple[Tool, ...]:
        """The tools the prompt shows and a call may name."""
        if self.choice == "none":
            return ()
        if self.choice in ("auto", "required"):
            return self.tools
        return tuple(t for t in self.tools if t.name == self.choice)

    @property
    def forced(self) -> bool:
        return self.choice not in ("auto", "none")


def parse_tools(tools: Any, tool_choice: Any, parallel_tool_calls: Any) -> ToolUse | None:
    """The request's `tools`, `tool_choice` and `parallel_tool_calls`, checked; None without tools."""
    if tools is None or tools == []:
        if tool_choice not in (None, "none", "auto"):
            raise ToolError("'tool_choice' needs 'tools'")
        return None
    if not isinstance(tools, list):
        raise ToolError("'tools' must be a list")
    if len(tools) > MAX_TOOLS:
        raise ToolError(f"'tools' has {len(tools)} functions; at most {MAX_TOOLS}")
    parsed: list[Tool] = []
    names: set[str] = set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise ToolError(f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": {{...}}}}")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ToolError(f"'tools[{i}].function.name' must be 1 to 64 letters, digits, _ . : or -")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise ToolError(f"'tools[{i}].function.parameters' must be a JSON schema object")
        if name in names:
            raise ToolError(f"'tools' names the function {name!r} twice")
        names.add(name)
        parsed.append(Tool(name, str(function.get("description") or ""), parameters))
    choice: str
    if tool_choice is None:
        choice = "auto"
    elif tool_choice in ("auto", "none", "required"):
        choice = tool_choice
    elif (isinstance(tool_choice, dict) and tool_choice.get("type") == "function"
          and isinstance(tool_choice.get("function"), dict)):
        choice = str(tool_choice["function"].get("name"))
        if not any(t.name == choice for t in parsed):
            raise ToolError(f"'tool_choice' names the function {choice!r}, which is not in 'tools'")
    else:
        raise ToolError("'tool_choice' must be \"auto\", \"none\", \"required\" or "
                        "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    return ToolUse(tuple(parsed), choice, parallel_tool_calls is True)


# -- the prompt ----------------------------------------------------------------------------------

def template_knows_tools(template_source: str) -> bool:
    return "tools" in template_source


def family_of(template_source: str | None) -> Family:
    source = template_source or ""
    if "[TOOL_CALLS]" in source:
        return "mistral"
    if "<|python_tag|>" in source or "ipython" in source:
        return "llama3"
    return "hermes"


GENERIC_INSTRUCTIONS = """You can call functions. Here they are, as JSON schemas:
{tools}
To call one or more, answer with nothing but one block per call:
<tool_call>
{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}
</tool_call>
Otherwise, answer normally. A function's result comes back between <tool_response> and </tool_response>."""


def generic_messages(messages: list[dict[str, Any]], use: ToolUse) -> list[dict[str, Any]]:
    """Messages for a template that knows no tools: the tools in a system message, calls and
    results written out in the Hermes style."""
    rendered: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        content = message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = "\n".join(f"<tool_call>\n{json.dumps(_call_object(c))}\n</tool_call>"
                              for c in message["tool_calls"])
            rendered.append({"role": "assistant", "content": (content + "\n" if content else "") + calls})
        elif role == "tool":
            rendered.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            rendered.append({"role": role, "content": content})
    if use.offered:
        instructions = GENERIC_INSTRUCTIONS.format(tools="\n".join(json.dumps(t.openai()) for t in use.offered))
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {"role": "system", "content": rendered[0]["content"] + "\n\n" + instructions}
        else:
            rendered.insert(0, {"role": "system", "content": instructions})
    return rendered


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template that knows tools: arguments as objects (the templates `tojson` them)."""
    rendered = []
    for message in messages:
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                function = dict(call.get("function") or {})
                function["arguments"] = _arguments_object(function.get("arguments"))
                calls.append({**call, "function": function})
            message = {**message, "tool_calls": calls}
        rendered.append(message)
    return rendered


def _arguments_object(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _call_object(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    return {"name": function.get("name"), "arguments": _arguments_object(function.get("arguments", {}))}


# -- the grammar that makes a call certain ------------------------------------------------------

def closed(schema: Any) -> Any:
    """The schema with every object that lists its properties and says nothing more closed to
    others: a call must be the function's arguments, not whatever a model adds after them."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: closed(value) for key, value in schema.items()}
    if "properties" in result and "additionalProperties" not in result and "patternProperties" not in result:
        result["additionalProperties"] = False
    return result


def forced_call_grammar(use: ToolUse, family: Family) -> str:
    """A Lark grammar (llguidance's dialect) for answers made only of calls to the offered tools."""
    variants = []
    for tool in use.offered:
        key = "parameters" if family == "llama3" else "arguments"
        variants.append({"type": "object", "properties": {"name": {"const": tool.name}, key: closed(tool.parameters)},
                         "required": ["name", key], "additionalProperties": False})
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    call = inline_json(schema)
    more = f"{{0,{MAX_PARALLEL_CALLS - 1}}}"
    if family == "mistral":
        rest = f' ("," call){more}' if use.parallel else ""
        return f'start: "[TOOL_CALLS]" "[" call{rest} "]"\ncall: {call}\n'
    if family == "llama3":
        return f"start: call\ncall: {call}\n"
    rest = f" (/\\n?/ block){more}" if use.parallel else ""
    return f'start: block{rest}\nblock: "<tool_call>\\n" call "\\n</tool_call>"\ncall: {call}\n'


# -- reading calls out of an answer ---------------------------------------------------------------

START_MARKERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>")
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parse_calls(text: str, use: ToolUse, family: Family) -> tuple[str, list[ToolCall]]:
    """(the text that is not a call, the calls) of an answer; calls to unknown tools are text."""
    names = {t.name for t in use.offered}
    for parser in _parsers(family):
        found = parser(text)
        if found is None:
            continue
        content, objects = found
        calls = [c for c in (_as_call(o, names) for o in objects) if c is not None]
        if calls and len(calls) == len(objects):
            return content, (calls if use.parallel else calls[:1])
    return text, []


def _parsers(family: Family):  # type: ignore[no-untyped-def]
    order = {"hermes": [_parse_hermes], "llama3": [_parse_python_tag, _parse_json], "mistral": [_parse_mistral]}
    first = order[family]
    rest = [p for p in (_parse_hermes, _parse_mistral, _parse_python_tag, _parse_json) if p not in first]
    return first + rest


def _parse_hermes(text: str) -> tuple[str, list[Any]] | None:
    if "<tool_call>" not in text:
        return None
    blocks = list(_HERMES.finditer(text))
    if len(blocks) > 1 and not blocks[-1].group(0).rstrip().endswith("</tool_call>") \
            and _loads(blocks[-1].group(1)) is None:
        # The answer was cut inside its last call (max_tokens): the complete ones still count.
        text = text[: blocks[-1].start()]
        blocks.pop()
    objects = [_loads(block.group(1)) for block in blocks]
    content = _HERMES.sub("", text).strip()
    return content, objects


def _parse_mistral(text: str) -> tuple[str, list[Any]] | None:
    if "[TOOL_CALLS]" not in text:
        return None
    content, _, rest = text.partition("[TOOL_CALLS]")
    loaded = _loads(rest.strip())
    return content.strip(), loaded if isinstance(loaded, list) else [loaded]


def _parse_python_tag(text: str) -> tuple[str, list[Any]] | None:
    if "<|python_tag|>" not in text:
        return None
    content, _, rest = text.partition("<|python_tag|>")
    objects = [_loads(part) for part in rest.split(";") if part.strip()]
    return content.strip(), objects


def _parse_json(text: str) -> tuple[str, list[Any]] | None:
    stripped = text.strip()
    if not stripped.startswith(("{", "[")):
        return None
    loaded = _loads(stripped)
    return "", loaded if isinstance(loaded, list) else [loaded]


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _as_call(obj: Any, names: set[str]) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):  # an OpenAI-shaped call
        obj = obj["function"]
    name = obj.get("name")
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(name, str) or name not in names:
        return None
    if isinstance(arguments, str):
        arguments = _arguments_object(arguments)
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def might_start_a_call(text: str) -> bool:
    """Could `text` (what the model wrote so far, stripped) be the beginning of a call? A streamed
    answer is held back while it could."""
    if not text:
        return True
    if text[0] in "{[":
        return True
    return any(marker.startswith(text) or text.startswith(marker) for marker in START_MARKERS)


def first_call_marker(text: str) -> int:
    """Where the first call marker starts in `text`, or -1."""
    return min((text.find(m) for m in START_MARKERS if m in text), default=-1)


def partial_call_marker(text: str) -> int:
    """How many characters at the end of `text` could be the start of a call marker."""
    best = 0
    for marker in START_MARKERS:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best
