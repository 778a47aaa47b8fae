"""What llama.cpp's router reports about a model beyond its status, read from GGUF headers.

- `architecture`: `{"input_modalities": ["text", "image"?, "audio"?], "output_modalities": ["text"]}`,
  known before any load: llama.cpp reads the projector's (mmproj) header for its encoders.
- `meta` of a running model: llama.cpp's child reports `vocab_type`, `n_vocab`, `n_ctx`,
  `n_ctx_train`, `n_embd`, `n_params`, `size`, `ftype`; modelyard's child reports most of them in
  its `ready` payload, and the rest (`vocab_type`, `n_embd`, `ftype`) come from the model's header.
- `info` of the first `loaded` event: llama.cpp's child's own /v1/models entry, with that meta.

Headers are read once per file version (path, size, modification time), off the event loop, and
only of regular files; a listing waits for a slow read at most READ_WAIT_S (a file that blocks
its reader, a FIFO say, must not hang /models: the answer then lacks what that header would add).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import stat
import time
from collections.abc import Iterable
from typing import Any

from router.gguf_header import read_metadata
from router.model_record import ModelRecord
from router.model_sources import SOURCE_CACHE

log = logging.getLogger(__name__)

OWNED_BY = "modelyard"
MAX_CACHED_FILES = 512
READ_WAIT_S = 2.0

# llama.h's enum llama_vocab_type, by the header's tokenizer.ggml.model.
VOCAB_TYPES = {"no_vocab": 0, "none": 0, "llama": 1, "gpt2": 2, "bert": 3, "t5": 4, "rwkv": 5, "plamo2": 6}

# llama_model_ftype_name(), by the header's general.file_type (llama.h's enum llama_ftype).
FTYPE_NAMES = {
    0: "all F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K - Medium", 11: "Q3_K - Small", 12: "Q3_K - Medium", 13: "Q3_K - Large",
    14: "Q4_K - Small", 15: "Q4_K - Medium", 16: "Q5_K - Small", 17: "Q5_K - Medium", 18: "Q6_K",
    19: "IQ2_XXS - 2.0625 bpw", 20: "IQ2_XS - 2.3125 bpw", 21: "Q2_K - Small", 22: "IQ3_XS - 3.3 bpw",
    23: "IQ3_XXS - 3.0625 bpw", 24: "IQ1_S - 1.5625 bpw", 25: "IQ4_NL - 4.5 bpw", 26: "IQ3_S - 3.4375 bpw",
    27: "IQ3_S mix - 3.66 bpw", 28: "IQ2_S - 2.5 bpw", 29: "IQ2_M - 2.7 bpw", 30: "IQ4_XS - 4.25 bpw",
    31: "IQ1_M - 1.75 bpw", 32: "BF16", 36: "TQ1_0 - 1.69 bpw ternary", 37: "TQ2_0 - 2.06 bpw ternary",
    38: "MXFP4 MoE",
}

_Key = tuple[str, int, int]
_facts: dict[_Key, dict[str, Any]] = {}
_reading: dict[_Key, asyncio.Future[dict[str, Any]]] = {}


def _key(path: str) -> _Key | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    return (path, info.st_size, info.st_mtime_ns)


def _read(key: _Key) -> dict[str, Any]:
    """Blocking: the facts of one file, {} when it cannot be read."""
    try:
        fields = read_metadata(key[0])
    except (OSError, ValueError) as exc:  # GGUFHeaderError is a ValueError
        log.warning("cannot read the GGUF header of %s: %s", key[0], exc)
        return {}
    arch = str(fields.get("general.architecture", ""))
    facts: dict[str, Any] = {
        "vision": bool(fields.get("clip.has_vision_encoder")),
        "audio": bool(fields.get("clip.has_audio_encoder")),
    }
    tokenizer = fields.get("tokenizer.ggml.model")
    if isinstance(tokenizer, str):
        facts["vocab_type"] = VOCAB_TYPES.get(tokenizer, 0)
    n_embd = fields.get(f"{arch}.embedding_length")
    if isinstance(n_embd, int):
        facts["n_embd"] = n_embd
    file_type = fields.get("general.file_type")
    if isinstance(file_type, int):
        facts["ftype"] = FTYPE_NAMES.get(file_type, "unknown, may not work")
    return facts


def cached_facts(path: str | None) -> dict[str, Any]:
    """What is known of the file without reading it ({} until `read_facts` has read it)."""
    key = _key(path) if path else None
    return _facts.get(key, {}) if key else {}


async def read_facts(paths: Iterable[str | None]) -> None:
    """Read the headers of the files not read yet, off the event loop; one read per file at a
    time, waited for at most READ_WAIT_S."""
    missing = {key for path in paths if path and (key := _key(path)) is not None and key not in _facts}
    if not missing:
        return
    pending = []
    for key in missing:
        reading = _reading.get(key)
        if reading is None:
            reading = _reading[key] = asyncio.ensure_future(asyncio.to_thread(_read, key))
            reading.add_done_callback(functools.partial(_keep, key))
        pending.append(reading)
    await asyncio.wait(pending, timeout=READ_WAIT_S)


def _keep(key: _Key, done: asyncio.Future[dict[str, Any]]) -> None:
    _reading.pop(key, None)
    if done.cancelled() or done.exception() is not None:
        return
    if len(_facts) >= MAX_CACHED_FILES:
        _facts.clear()
    _facts[key] = done.result()


def header_paths(record: ModelRecord) -> list[str | None]:
    """The files whose headers `architecture` and `meta` of this model read."""
    return [_projector(record), record.resolved_model_path]


def _projector(record: ModelRecord) -> str | None:
    value = record.spec.options.get("mmproj")
    return value if isinstance(value, str) and value else None


def architecture(record: ModelRecord) -> dict[str, list[str]]:
    projector = cached_facts(_projector(record))
    inputs = ["text"]
    if projector.get("vision"):
        inputs.append("image")
    if projector.get("audio"):
        inputs.append("audio")
    return {"input_modalities": inputs, "output_modalities": ["text"]}


def can_remove(record: ModelRecord) -> bool:
    """Only a downloaded model can be deleted (DELETE /models), as in llama.cpp."""
    return record.spec.source == SOURCE_CACHE


def loaded_meta(record: ModelRecord, payload: dict[str, Any]) -> dict[str, Any]:
    """The child's `ready` payload, with llama.cpp's meta keys it lacks taken from the header.

    A llama.cpp child (`bin`) reports its whole /v1/models entry; its `meta` is the meta."""
    inner = payload.get("meta")
    meta = dict(inner) if isinstance(inner, dict) else dict(payload)
    facts = cached_facts(record.resolved_model_path)
    for key in ("vocab_type", "n_embd", "ftype"):
        if key in facts:
            meta.setdefault(key, facts[key])
    return meta


def loaded_info(record: ModelRecord, payload: dict[str, Any]) -> dict[str, Any]:
    """The `info` of the first `loaded` status event: llama.cpp's child's /v1/models entry."""
    return {
        "id": record.name, "aliases": list(record.spec.aliases), "tags": list(record.spec.tags),
        "object": "model", "architecture": architecture(record), "created": int(time.time()),
        "owned_by": OWNED_BY, "meta": loaded_meta(record, payload),
    }


def entry(record: ModelRecord, created: int) -> dict[str, Any]:
    """A /models entry: the record's own, plus llama.cpp's `architecture`, `can_remove`, `meta`."""
    listed = record.to_json(created)
    if not record.is_local:
        # A peer's model: what the peer said of it; a remote server's: nothing known but text.
        listed.setdefault("architecture", {"input_modalities": ["text"], "output_modalities": ["text"]})
        listed["can_remove"] = False
        return listed
    listed["architecture"] = architecture(record)
    listed["can_remove"] = can_remove(record)
    if "meta" in listed:
        listed["meta"] = loaded_meta(record, listed["meta"])
    return listed
