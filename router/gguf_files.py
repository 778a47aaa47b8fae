"""How GGUF files are named, as llama.cpp and the Hugging Face Hub name them.

- A quant tag in the file name (`model-Q4_K_M.gguf`) tells the quantization.
- A sharded model is `NAME-00001-of-0000N.gguf` .. `NAME-0000N-of-0000N.gguf`; the first shard
  stands for the model.
- A file with `mmproj` in its name is a multimodal projector, not a model.

One home for these rules: the models-dir scan, the Hugging Face cache listing and removal, and the
download planner all ask here, so they always agree on which files make up one model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import PurePosixPath

QUANT_TAG = re.compile(r"(?i)(?<![A-Za-z0-9])(I?Q\d(?:_[A-Z0-9]+)*|BF16|F16|F32)(?![A-Za-z0-9])")
SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


def is_projector(name: str) -> bool:
    return name.endswith(".gguf") and "mmproj" in PurePosixPath(name).name.lower()


def is_main_gguf(name: str) -> bool:
    """A model file: a GGUF that is no projector and no shard but the first."""
    if not name.endswith(".gguf") or is_projector(name):
        return False
    shard = SHARD.search(name)
    return shard is None or shard.group(1) == "00001"


def strip_shard(name: str) -> str:
    """`m-00001-of-00002.gguf` -> `m.gguf`; other names unchanged."""
    return SHARD.sub(".gguf", name)


def quant_of(name: str) -> str | None:
    match = QUANT_TAG.search(PurePosixPath(strip_shard(name)).name)
    return match.group(1).upper() if match else None


def shard_files(main: str, names: Iterable[str]) -> list[str]:
    """Every file of the model whose first file is `main` (paths in the same form as `names`).

    Shards match exactly: the same name before `-NNNNN-of-TOTAL.gguf` and the same TOTAL, so
    `m-Q4_0-00001-of-00002.gguf` never claims `m-Q4_0_4_4.gguf` or another shard set.
    """
    shard = SHARD.search(main)
    if shard is None:
        return [main]
    prefix = main[: shard.start()]
    own = re.compile(re.escape(prefix) + r"-\d{5}-of-" + shard.group(2) + r"\.gguf$")
    return sorted(name for name in names if own.fullmatch(name))


def pick_projector(names: Iterable[str]) -> str | None:
    """The projector to use among `names`: an f16 one if there is one, else the first by name."""
    projectors = sorted(name for name in names if is_projector(name))
    return next((p for p in projectors if "f16" in p.lower()), projectors[0] if projectors else None)
