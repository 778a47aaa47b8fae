"""How a model's child is started: its command line, its environment, and (for a `cmd` server,
which says nothing) how the router tells that it is ready.

Three kinds of child:
- modelyard's own child (`python -m child`): binds port 0 itself and reports the real port in its
  `ready` line, so there is no race between picking a port and binding it;
- `bin`: a llama-server-compatible program (llama.cpp's llama-server speaks the same protocol); the
  router picks its port, as llama.cpp's router does;
- `cmd`: any OpenAI-compatible server with ${PORT} and ${MODEL} macros; no protocol, so readiness
  is polled on its check endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from child import serving
from child.protocol import ROUTER_PORT_ENV
from router.model_sources import ModelSpec
from router.upstream import LOCAL_HOST
from router.upstream_client import UpstreamClient, UpstreamError

CHILD_HOST = LOCAL_HOST
READY_POLL_INTERVAL_S = 0.2
READY_PROBE_TIMEOUT_S = 2.0
# Variables of the router that must never reach a child: the API key above all, and the Hugging
# Face token, which only the router's own downloads use (a third-party `bin` or `cmd` server would
# otherwise get the user's token with its environment).
RESERVED_ENV = ("LLAMA_API_KEY", "LLAMA_ARG_API_KEY", "LLAMA_ARG_API_KEY_FILE", "LLAMA_ARG_HOST",
                "LLAMA_ARG_PORT", "LLAMA_ARG_MODELS_PRESET", "LLAMA_ARG_MODELS_DIR",
                "LLAMA_ARG_MODELS_MAX", "LLAMA_ARG_MODELS_AUTOLOAD", "LLAMA_ARG_TIMEOUT",
                "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_TOKEN")


@dataclass(frozen=True)
class LaunchPlan:
    argv: list[str]
    assigned_port: int | None  # picked by the router; None when the child reports its own


def plan_launch(spec: ModelSpec, model_path: str) -> LaunchPlan:
    if spec.foreign_cmd:
        port = serving.free_port(CHILD_HOST)
        macros = {"${PORT}": str(port), "${MODEL}": model_path}
        return LaunchPlan([_expand(part, macros) for part in spec.foreign_cmd], port)
    if spec.foreign_bin:
        port = serving.free_port(CHILD_HOST)
        program, port_arg, assigned = list(spec.foreign_bin), str(port), port
    else:
        program, port_arg, assigned = [sys.executable, "-m", "child"], "0", None
    argv = [*program, *spec.child_args(model_path), "--host", CHILD_HOST, "--port", port_arg, "--alias", spec.name]
    return LaunchPlan(argv, assigned)


def child_env(router_port: int, spec: ModelSpec) -> dict[str, str]:
    """The router's environment without its secrets, with the model's own `env` on top."""
    env = {k: v for k, v in os.environ.items() if k not in RESERVED_ENV}
    env.update(spec.env)
    speaks_protocol = spec.speaks_protocol
    if speaks_protocol:
        env[ROUTER_PORT_ENV] = str(router_port)
    else:
        env.pop(ROUTER_PORT_ENV, None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


async def wait_until_http_ready(client: UpstreamClient, port: int, path: str,
                                still_waiting: Callable[[], bool]) -> bool:
    """Poll the child's `path` until it answers 200 (True) or nobody waits any more (False); the
    registry's load timeout ends the wait for every kind of child alike."""
    while still_waiting():
        with contextlib.suppress(UpstreamError, TimeoutError):
            status, _ = await client.fetch("GET", CHILD_HOST, port, path, READY_PROBE_TIMEOUT_S)
            if status == 200:
                return True
        await asyncio.sleep(READY_POLL_INTERVAL_S)
    return False


def _expand(part: str, macros: dict[str, str]) -> str:
    for macro, value in macros.items():
        part = part.replace(macro, value)
    return part
