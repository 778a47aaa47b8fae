"""The router <-> child wire protocol, defined once.

Child -> router, one line each on the child's stdout:
    cmd_child_to_router:state:{"state": "<state>", "payload": {...}}
Router -> child, on the child's stdin:
    cmd_router_to_child:exit

The router imports this module; the child never imports router code. llama.cpp's llama-server
speaks the same lines, so the router can supervise it too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

CHILD_TO_ROUTER_STATE_PREFIX = "cmd_child_to_router:state:"
ROUTER_TO_CHILD_EXIT = "cmd_router_to_child:exit"

# The child knows it runs under a router from this variable (the router's port), as llama.cpp's do.
ROUTER_PORT_ENV = "LLAMA_SERVER_ROUTER_PORT"

# Resumable streams: a request carrying this header (llama.cpp's name) feeds a replay session. The
# router checks an id before it remembers which model owns it, the child before it opens a session:
# one rule for both, so neither keeps what the other refuses. The characters of UUIDs, ULIDs and
# (url-safe) base64, and no `/`, since an id also travels in a path (/v1/stream/ID).
CONVERSATION_HEADER = "x-conversation-id"
MAX_CONVERSATION_ID_CHARS = 256
_CONVERSATION_ID = re.compile(r"[A-Za-z0-9._~:@+=-]+")


def conversation_id_problem(value: str) -> str | None:
    """Why `value` (already stripped) is not a usable conversation id, or None if it is."""
    if not 1 <= len(value) <= MAX_CONVERSATION_ID_CHARS:
        return f"X-Conversation-Id must be 1 to {MAX_CONVERSATION_ID_CHARS} characters"
    if not _CONVERSATION_ID.fullmatch(value):
        return "X-Conversation-Id may only hold letters, digits and . _ ~ : @ + = -"
    return None


class ChildState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    SLEEPING = "sleeping"


@dataclass(frozen=True)
class StateMessage:
    state: ChildState
    payload: dict[str, Any]


class ProtocolError(ValueError):
    """A line carried the protocol prefix but its JSON or state is malformed."""


def encode_state(state: ChildState, payload: dict[str, Any] | None = None) -> str:
    """The protocol line (without newline) announcing `state`."""
    body = {"state": str(state), "payload": payload or {}}
    return CHILD_TO_ROUTER_STATE_PREFIX + json.dumps(body, separators=(",", ":"))


def parse_child_line(line: str) -> StateMessage | None:
    """Parse one stdout line of a child.

    Returns None for a line that is not a protocol line (a log line: llama.cpp's children mix them
    in); raises ProtocolError for a protocol line that is malformed.
    """
    line = line.rstrip("\r\n")
    if not line.startswith(CHILD_TO_ROUTER_STATE_PREFIX):
        return None
    raw = line[len(CHILD_TO_ROUTER_STATE_PREFIX) :]
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"invalid JSON in state line: {exc}") from exc
    if not isinstance(body, dict):
        raise ProtocolError("state line is not a JSON object")
    try:
        state = ChildState(str(body.get("state")))
    except ValueError as exc:
        raise ProtocolError(f"unknown state {body.get('state')!r}") from exc
    payload = body.get("payload") or {}
    if not isinstance(payload, dict):
        raise ProtocolError("state payload is not a JSON object")
    return StateMessage(state=state, payload=payload)


def is_exit_command(line: str) -> bool:
    return line.strip() == ROUTER_TO_CHILD_EXIT
