"""GGUF models in the Hugging Face cache: naming, listing (source `cache`), removal.

A cached model is named `user/repo:QUANT` (the quant tag read from the file name, as in
`model-Q4_K_M.gguf`), or `user/repo` when no tag can be read. Listing and removal go through
huggingface_hub's own cache scanner, so the cache stays in the layout its tools expect.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import scan_cache_dir
from huggingface_hub.errors import CacheNotFound

log = logging.getLogger(__name__)

QUANT_TAG = re.compile(r"(?i)(?<![A-Za-z0-9])(I?Q\d(?:_[A-Z0-9]+)*|BF16|F16|F32)(?![A-Za-z0-9])")
SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
REPO_REFERENCE = re.compile(r"^([A-Za-z0-9][\w.-]*)/([\w.-]+?)(?::([\w.-]+))?$")


@dataclass(frozen=True)
class CachedModel:
    name: str
    repo_id: str
    model_path: str
    projector_path: str | None


def quant_of(file_name: str) -> str | None:
    match = QUANT_TAG.search(SHARD.sub(".gguf", file_name))
    return match.group(1).upper() if match else None


def model_name(repo_id: str, file_name: str) -> str:
    quant = quant_of(file_name)
    return f"{repo_id}:{quant}" if quant else repo_id


def parse_reference(reference: str) -> tuple[str, str | None]:
    """`user/repo[:quant]` -> (repo id, quant); ValueError for anything else (paths included)."""
    match = REPO_REFERENCE.match(reference.strip())
    if not match or ".." in reference:
        raise ValueError(f"expected 'user/repo' or 'user/repo:quant', got {reference!r}")
    return f"{match.group(1)}/{match.group(2)}", match.group(3)


def is_main_gguf(file_name: str) -> bool:
    if not file_name.endswith(".gguf") or "mmproj" in file_name.lower():
        return False
    shard = SHARD.search(file_name)
    return shard is None or shard.group(1) == "00001"


def list_cached_models(cache_dir: str | None = None) -> list[CachedModel]:
    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return []
    found: list[CachedModel] = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        files = {f.file_name: str(f.file_path) for revision in repo.revisions for f in revision.files}
        projectors = sorted(name for name in files if name.endswith(".gguf") and "mmproj" in name.lower())
        for file_name in sorted(files):
            if is_main_gguf(file_name):
                found.append(CachedModel(model_name(repo.repo_id, file_name), repo.repo_id, files[file_name],
                                         files[projectors[0]] if projectors else None))
    return found


def remove_cached_model(model: CachedModel, cache_dir: str | None = None) -> None:
    """Delete the model's files (every shard and their blobs); the whole repo if no GGUF is left."""
    info = scan_cache_dir(cache_dir)
    repo = next((r for r in info.repos if r.repo_id == model.repo_id and r.repo_type == "model"), None)
    if repo is None:
        return
    main = Path(model.model_path).name
    prefix = SHARD.sub("", main) if SHARD.search(main) else None
    doomed = {main} | ({f.file_name for rev in repo.revisions for f in rev.files
                        if prefix and f.file_name.startswith(prefix)})
    remaining = set()
    for revision in repo.revisions:
        for cached in revision.files:
            if cached.file_name in doomed:
                cached.file_path.unlink(missing_ok=True)
                Path(cached.blob_path).unlink(missing_ok=True)
            elif is_main_gguf(cached.file_name):
                remaining.add(cached.file_name)
    if not remaining:
        shutil.rmtree(repo.repo_path, ignore_errors=True)
    log.info("removed %s from the Hugging Face cache", model.name)


def remove_partial_files(repo_id: str, cache_dir: str | None = None) -> None:
    """After a cancelled download: no `.incomplete` blob, and no repo folder left with nothing in it."""
    from huggingface_hub import constants

    root = Path(cache_dir or constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    if not root.is_dir():
        return
    for partial in root.glob("blobs/*.incomplete"):
        partial.unlink(missing_ok=True)
    if not any(root.glob("snapshots/*/*.gguf")):
        shutil.rmtree(root, ignore_errors=True)
    lock_dir = Path(cache_dir or constants.HF_HUB_CACHE) / ".locks" / root.name
    shutil.rmtree(lock_dir, ignore_errors=True)
