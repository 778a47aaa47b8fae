"""GGUF models in the Hugging Face cache: naming, listing (source `cache`), removal, and cleaning
up after a download that did not finish.

A cached model is named `user/repo:QUANT` (the quant tag read from the file name, as in
`model-Q4_K_M.gguf`), or `user/repo` when no tag can be read. Listing and removal go through
huggingface_hub's own cache scanner, so the cache stays in the layout its tools expect. Removal
and cleanup only ever touch the files of the one model (or the one download) they are about:
other quants of the same repository stay, and so does a blob another file still points at.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout
from huggingface_hub import constants, scan_cache_dir
from huggingface_hub.errors import CacheNotFound

from router.gguf_files import is_main_gguf, pick_projector, quant_of, shard_files

log = logging.getLogger(__name__)

REPO_REFERENCE = re.compile(r"^([A-Za-z0-9][\w.-]*)/([\w.-]+?)(?::([\w.-]+))?$")


@dataclass(frozen=True)
class CachedModel:
    name: str
    repo_id: str
    model_path: str
    projector_path: str | None


def model_name(repo_id: str, file_name: str) -> str:
    quant = quant_of(file_name)
    return f"{repo_id}:{quant}" if quant else repo_id


def parse_reference(reference: str) -> tuple[str, str | None]:
    """`user/repo[:quant]` -> (repo id, quant); ValueError for anything else (paths included)."""
    match = REPO_REFERENCE.match(reference.strip())
    if not match or ".." in reference:
        raise ValueError(f"expected 'user/repo' or 'user/repo:quant', got {reference!r}")
    return f"{match.group(1)}/{match.group(2)}", match.group(3)


def repo_folder(repo_id: str, cache_dir: str | None = None) -> Path:
    return Path(cache_dir or constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))


def _snapshot_files(repo_path: Path) -> dict[str, Path]:
    """Every file of every snapshot, by its path inside the repository (`Q4_K_M/m.gguf`)."""
    files: dict[str, Path] = {}
    for snapshot in sorted((repo_path / "snapshots").glob("*")):
        for path in snapshot.rglob("*"):
            if path.is_file() or path.is_symlink():
                files.setdefault(path.relative_to(snapshot).as_posix(), path)
    return files


def cached_repo_files(repo_id: str, cache_dir: str | None = None) -> list[str]:
    """The files of a repository the cache holds, by their path inside it (no network)."""
    return sorted(_snapshot_files(repo_folder(repo_id, cache_dir)))


def list_cached_models(cache_dir: str | None = None) -> list[CachedModel]:
    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return []
    found: list[CachedModel] = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        files = {name: str(path) for name, path in _snapshot_files(Path(repo.repo_path)).items()}
        projector = pick_projector(files)
        for name in sorted(files):
            if is_main_gguf(name):
                found.append(CachedModel(model_name(repo.repo_id, name), repo.repo_id, files[name],
                                         files[projector] if projector else None))
    return found


def _blob_of(pointer: Path) -> Path | None:
    """The blob a snapshot entry points at (None for a plain file, as without symlink support)."""
    if not pointer.is_symlink():
        return None
    return (pointer.parent / os.readlink(pointer)).resolve()


def _remove_pointers(repo_path: Path, doomed: set[str], keep_paths: frozenset[str] = frozenset()) -> None:
    """Delete these snapshot entries, and each blob no remaining entry points at; never an entry
    whose path is in `keep_paths` (files a model in use points at)."""
    files = _snapshot_files(repo_path)
    kept = {name for name, path in files.items() if name not in doomed or os.path.abspath(path) in keep_paths}
    kept_blobs = {_blob_of(files[name]) for name in kept}
    for name in doomed - kept:
        path = files.get(name)
        if path is None:
            continue
        blob = _blob_of(path)
        path.unlink(missing_ok=True)
        if blob is not None and blob not in kept_blobs:
            blob.unlink(missing_ok=True)


def _prune_empty(repo_path: Path) -> None:
    """Remove the repository's folder when no model file is left in it (refs and empty folders
    do not count), along with its lock folder."""
    if not repo_path.is_dir():
        return
    left = [p for p in repo_path.rglob("*") if (p.is_file() or p.is_symlink()) and p.parent.name != "refs"
            and p.parent.parent.name != "refs"]
    if left:
        return
    shutil.rmtree(repo_path, ignore_errors=True)
    shutil.rmtree(repo_path.parent / ".locks" / repo_path.name, ignore_errors=True)


def remove_cached_model(model: CachedModel, cache_dir: str | None = None) -> None:
    """Delete the model's files (every shard of it; the projector too when no other model of the
    repository is left), and the repository's folder once nothing is left in it."""
    repo_path = repo_folder(model.repo_id, cache_dir)
    files = _snapshot_files(repo_path)
    main = next((name for name, path in files.items() if str(path) == model.model_path), None)
    if main is None:
        return
    doomed = set(shard_files(main, files))
    if not any(is_main_gguf(name) for name in files if name not in doomed):
        doomed |= {name for name in files if name.endswith(".gguf")}  # the projector has no model left
    _remove_pointers(repo_path, doomed)
    _prune_empty(repo_path)
    log.info("removed %s from the Hugging Face cache", model.name)


def remove_unfinished_download(repo_id: str, new_files: list[str], etags: list[str], prune: bool,
                               keep_paths: set[str] | None = None, cache_dir: str | None = None) -> None:
    """After a cancelled or failed download: remove what this download added and nothing else.

    `new_files` are the files of this download that were not in the cache before it started (the
    ones it completed are removed again: a model is all of its shards or nothing); `etags` are the
    blobs it was fetching, whose partial files an older huggingface_hub keeps as
    `blobs/<etag>.incomplete` (removed only while no other download holds that blob's lock).
    `prune`: remove the repository's folder if nothing is left in it (not while another download
    of the same repository runs: it may be about to write there). `keep_paths`: files models in
    use point at, which stay whatever else this download thinks.
    """
    repo_path = repo_folder(repo_id, cache_dir)
    if not repo_path.is_dir():
        return
    _remove_pointers(repo_path, set(new_files), frozenset(os.path.abspath(p) for p in keep_paths or ()))
    locks = repo_path.parent / ".locks" / repo_path.name
    for etag in etags:
        partial = repo_path / "blobs" / f"{etag}.incomplete"
        if not partial.exists():
            continue
        try:
            with FileLock(str(locks / f"{etag}.lock"), timeout=0):
                partial.unlink(missing_ok=True)
        except Timeout:
            pass  # another download is writing it now
    if prune:
        _prune_empty(repo_path)
