"""Memory facts for admission: a model's estimated resident size, what is available, what a child uses.

The estimate is the GGUF file (weights are mapped and touched) plus the KV cache for the model's
context (f16 keys and values for every layer), plus a fixed allowance for the child process and
libllama's compute buffers. It is deliberately on the high side: refusing a load that would have
fit costs one 503; admitting one that does not fit costs the machine.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import psutil

from router.gguf_header import read_metadata

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# A Python child with libllama's compute buffers for a small model, measured at about 150 MiB
# beyond weights and KV cache on this project's test models.
PROCESS_ALLOWANCE_BYTES = 150 * MIB
F16_BYTES = 2


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_ctx_train: int

    def kv_bytes(self, n_ctx: int) -> int:
        return n_ctx * self.n_layer * self.n_head_kv * (self.head_dim_k + self.head_dim_v) * F16_BYTES


def _first_int(value: object) -> int:
    if isinstance(value, list | tuple):
        return max(int(v) for v in value) if value else 0
    return int(value)  # type: ignore[call-overload]


def read_shape(path: str) -> ModelShape | None:
    """The numbers the KV estimate needs, from the GGUF header; None if it cannot be read.

    Cached per file version (path, size, modification time): a header is read once.
    """
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return _read_shape_cached(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _read_shape_cached(path: str, _size: int, _mtime_ns: int) -> ModelShape | None:
    try:
        fields = read_metadata(path)
    except (OSError, ValueError) as exc:  # any unreadable file just has no estimate (GGUFHeaderError included)
        log.warning("cannot read the GGUF header of %s: %s", path, exc)
        return None
    arch = str(fields.get("general.architecture", "llama"))

    def get(key: str, default: int = 0) -> int:
        value = fields.get(f"{arch}.{key}")
        return default if value is None else _first_int(value)

    n_head = get("attention.head_count", 1) or 1
    n_embd = get("embedding_length")
    head_dim = n_embd // n_head if n_head else 0
    return ModelShape(
        n_layer=get("block_count"),
        n_head_kv=get("attention.head_count_kv", n_head) or n_head,
        head_dim_k=get("attention.key_length", head_dim) or head_dim,
        head_dim_v=get("attention.value_length", head_dim) or head_dim,
        n_ctx_train=get("context_length", 4096),
    )


def estimate_model_bytes(path: str, n_ctx: int) -> int | None:
    """Estimated resident size of a child serving `path` with a total context of n_ctx (0 = trained).

    Reads the file's header the first time: blocking, run it off the event loop."""
    try:
        file_bytes = os.path.getsize(path)
    except OSError:
        return None
    shape = read_shape(path)
    kv = shape.kv_bytes(n_ctx if n_ctx > 0 else shape.n_ctx_train) if shape else 0
    return file_bytes + kv + PROCESS_ALLOWANCE_BYTES


def available_bytes() -> int:
    return int(psutil.virtual_memory().available)


def tree_rss_bytes(pid: int) -> int | None:
    """Resident memory of a process and its children (reads /proc: run it off the event loop)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total
    except psutil.NoSuchProcess:
        return None
