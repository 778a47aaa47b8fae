"""The child's embedding routes, as llama-server names and shapes them.

- `POST /v1/embeddings`: OpenAI's; `input` is a string, a list of strings, a token list or a list
  of token lists; `encoding_format` float or base64 (little-endian float32); L2-normalized unless
  `embd_normalize` says otherwise; `usage` counts the inputs' tokens.
- `POST /embedding` and `/embeddings`: llama-server's own shape, `[{"index", "embedding": [[...]]}]`
  (one row per input, or one per token with `--pooling none`); `content` may stand for `input`.

A model started without `--embeddings` answers 501 saying how to turn them on, as llama-server.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from child.engine.embeddings import EmbeddingError, check_input, normalize
from child.engine.llama_model import LlamaModel
from child.engine.scheduler import EngineStopped
from child.openai_schema import RequestError, parse_body
from child.runtime import ChildRuntime
from child.serving import cancelled_if_client_leaves

MAX_INPUTS = 2048  # per request, as OpenAI's API


class EmbeddingBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    input: str | list[str] | list[StrictInt] | list[list[StrictInt]] | None = None
    content: str | list[str] | list[StrictInt] | list[list[StrictInt]] | None = None  # llama-server's
    encoding_format: Literal["float", "base64"] = "float"
    embd_normalize: StrictInt = Field(default=2, ge=-1, le=32)  # -1 none, 0 max, 1 taxicab, 2 euclidean, p
    dimensions: int | None = None
    user: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The inputs: a string or a token list is one; a list of them is several."""
        value = self.input if self.input is not None else self.content
        if value is None:
            raise RequestError("'input' (or 'content') must be given")
        if isinstance(value, str):
            return [value]
        if not value:
            raise RequestError("'input' must not be empty")
        if all(isinstance(v, int) for v in value):
            return [list(value)]  # type: ignore[arg-type]
        if len(value) > MAX_INPUTS:
            raise RequestError(f"'input' has {len(value)} items; at most {MAX_INPUTS} per request")
        return list(value)  # type: ignore[arg-type]


def build_router(runtime: ChildRuntime) -> APIRouter:
    router = APIRouter()

    async def embed(request: Request) -> tuple[EmbeddingBody, list[np.ndarray], int]:
        if not runtime.settings.embeddings.enabled:
            raise RequestError("This server does not support embeddings. Start it with `--embeddings`", 501,
                               "not_supported_error")
        scheduler = runtime.scheduler
        if scheduler is None:
            raise RequestError("Loading model", 503, "unavailable_error")
        body = parse_body(await request.body(), EmbeddingBody)
        prompts = body.prompts()

        def tokenize(model: LlamaModel) -> tuple[list[list[int]], int]:
            return ([model.tokenize(p, add_special=True, parse_special=True) if isinstance(p, str) else p
                     for p in prompts], model.n_embd)

        try:
            inputs, n_embd = await asyncio.wrap_future(scheduler.call(tokenize))
            if body.dimensions is not None and body.dimensions != n_embd:
                raise RequestError(f"'dimensions' must be this model's {n_embd} (it cannot shorten its embeddings)")
            for i, tokens in enumerate(inputs):
                if not tokens:
                    raise RequestError(f"'input[{i}]' is empty")
                if any(t < 0 or t >= (runtime.n_vocab or 0) for t in tokens):
                    raise RequestError(f"'input[{i}]' has a token id outside the vocabulary")
                try:
                    check_input(tokens, runtime.settings.embeddings.batch_tokens)
                except EmbeddingError as exc:
                    raise RequestError(f"'input[{i}]': {exc}") from exc
            # A client that leaves cancels the future: its remaining inputs are not computed.
            async with cancelled_if_client_leaves(request.scope, request.receive):
                vectors = await asyncio.wrap_future(scheduler.embed(inputs))
        except EmbeddingError as exc:
            raise RequestError(str(exc)) from exc
        except EngineStopped as exc:
            raise RequestError(str(exc), 503, "unavailable_error") from exc
        return body, vectors, sum(len(t) for t in inputs)

    @router.post("/v1/embeddings")
    async def openai_embeddings(request: Request) -> JSONResponse:
        body, vectors, tokens = await embed(request)
        if vectors[0].ndim != 1:
            raise RequestError("Pooling type 'none' is not OAI compatible. Please use a different pooling type")
        data = [{"object": "embedding", "index": i, "embedding": _encoded(normalize(v, body.embd_normalize),
                                                                         body.encoding_format)}
                for i, v in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": body.model or runtime.settings.alias,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @router.post("/embedding")
    @router.post("/embeddings")
    async def native_embeddings(request: Request) -> JSONResponse:
        body, vectors, _ = await embed(request)
        rows: list[dict[str, Any]] = []
        for i, vector in enumerate(vectors):
            matrix = vector if vector.ndim == 2 else normalize(vector, body.embd_normalize)[None, :]
            rows.append({"index": i, "embedding": matrix.tolist()})
        return JSONResponse(rows)

    return router


def _encoded(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.astype(np.float32).tolist()
