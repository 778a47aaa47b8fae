"""Request-body schemas for the OpenAPI document (the handlers read raw JSON themselves, so that
every malformed body gets the OpenAI error shape; these only describe what they accept)."""

from __future__ import annotations

from typing import Any


def json_body(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "properties": properties, "required": required}}}}}


MODEL = {"type": "string", "example": "smollm2"}
MODEL_ONLY = json_body({"model": MODEL}, ["model"])
MESSAGES = {"type": "array", "items": {"type": "object", "properties": {
    "role": {"type": "string", "enum": ["system", "user", "assistant"]}, "content": {"type": "string"}},
    "required": ["role", "content"]}}
SAMPLING = {
    "max_tokens": {"type": "integer"}, "temperature": {"type": "number"}, "top_p": {"type": "number"},
    "top_k": {"type": "integer"}, "seed": {"type": "integer"}, "stream": {"type": "boolean"},
    "stop": {"type": "array", "items": {"type": "string"}}, "min_p": {"type": "number"},
    "presence_penalty": {"type": "number"}, "frequency_penalty": {"type": "number"},
    "repeat_penalty": {"type": "number"}, "logit_bias": {"type": "object", "additionalProperties": {"type": "number"}},
    "ignore_eos": {"type": "boolean"},
}
CHAT = json_body({"model": MODEL, "messages": MESSAGES, **SAMPLING}, ["model", "messages"])
COMPLETION = json_body({"model": MODEL, "prompt": {"type": "string"}, **SAMPLING}, ["model", "prompt"])
LOOKUP = json_body({"conversation_ids": {"type": "array", "items": {"type": "string"}}}, ["conversation_ids"])
