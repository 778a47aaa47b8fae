"""POST /models: fetch a GGUF model from the Hugging Face Hub in the background.

huggingface_hub does the work (HF_ENDPOINT, the cache layout, the blobs); this module picks the
files (the quant names the GGUF, every shard of it comes along, and a projector file if the repo
has one), reports progress on the status feed at most every 100 ms through a tqdm class
huggingface_hub accepts, and cancels on request. A cancelled or failed download leaves no partial
file and no model behind, and removes only what it added itself: other quants of the same
repository, finished or still downloading, are not its business.

Failures are told apart as a user needs them: a reference the hub does not know (or a quant the
repository lacks) is a 400, a hub that answers with an error is a 502, one that does not answer
in time a 504.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from typing import Any

import httpx
from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from tqdm.std import tqdm

from router.errors import GatewayTimeout, InvalidRequest, RouterError, UpstreamFailed
from router.gguf_files import is_main_gguf, pick_projector, quant_of, shard_files
from router.hf_cache import model_name, parse_reference, remove_unfinished_download
from router.model_record import ModelRecord
from router.model_sources import SOURCE_CACHE, ModelSpec
from router.registry import Registry

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.1
# huggingface_hub reports progress (and so can be cancelled) once per chunk, 10 MiB by default:
# a chunk of 1 MiB gives progress and cancellation at a useful grain at no cost in throughput.
DOWNLOAD_CHUNK_BYTES = 1024 * 1024
constants.DOWNLOAD_CHUNK_SIZE = DOWNLOAD_CHUNK_BYTES
DEFAULT_QUANT = "Q4_K_M"  # what llama.cpp picks when the reference names none
CANCEL_WAIT_S = 30.0


class DownloadCancelled(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class DownloadPlan:
    repo_id: str
    main_file: str
    files: tuple[str, ...]  # every shard of the main file, then the projector
    projector: str | None


def plan_download(reference: str, repo_files: list[str]) -> DownloadPlan:
    repo_id, quant = parse_reference(reference)
    candidates = sorted(f for f in repo_files if is_main_gguf(f))
    if not candidates:
        raise InvalidRequest(f"repository {repo_id} has no GGUF file")
    wanted = quant or DEFAULT_QUANT
    matching = [f for f in candidates if (quant_of(f) or "").upper() == wanted.upper()]
    if not matching and quant:
        raise InvalidRequest(f"repository {repo_id} has no GGUF file for quant {quant} "
                             f"(it has: {', '.join(candidates)})")
    main = (matching or candidates)[0]
    projector = pick_projector(repo_files)
    files = shard_files(main, repo_files) + ([projector] if projector else [])
    return DownloadPlan(repo_id, main, tuple(files), projector)


class Downloads:
    def __init__(self, registry: Registry, token: str | None) -> None:
        self.registry = registry
        self.token = token
        self._active: dict[str, tuple[asyncio.Task[None], threading.Event]] = {}
        self._plans: dict[str, DownloadPlan] = {}  # of the downloads running, by model name

    async def clean_up_after(self, record: ModelRecord, plan: DownloadPlan, new_files: list[str],
                             etags: list[str]) -> None:
        """Remove what a cancelled or failed download added: the files it found missing when it
        started, but for what another download of the repository planned too or a model already
        uses (a shared projector, say): "not in the cache when it started" is not "its own"."""
        others = [p for n, p in self._plans.items() if n != record.name and p.repo_id == plan.repo_id]
        planned_elsewhere = {f for other in others for f in other.files}
        await asyncio.to_thread(remove_unfinished_download, plan.repo_id,
                                [f for f in new_files if f not in planned_elsewhere], etags,
                                prune=not others, keep_paths=_in_use(self.registry, record))

    def _etag_of(self, repo_id: str, file_name: str) -> str:
        """The name of the blob a file is stored under (for cleaning up after it)."""
        return str(get_hf_file_metadata(hf_hub_url(repo_id, file_name), token=self.token).etag or "")

    async def start(self, reference: str) -> str:
        """Validate the reference against the hub and start the download; returns the model's name."""
        try:
            repo_id, _ = parse_reference(reference)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
        try:
            repo_files = await asyncio.to_thread(HfApi(token=self.token).list_repo_files, repo_id)
        except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many kinds: sorted below
            raise hub_error(f"model validation failed, unable to download {reference}", exc) from exc
        plan = plan_download(reference, repo_files)
        name = model_name(plan.repo_id, plan.main_file)
        if self.registry.lookup(name) is not None or self.registry.lookup(reference) is not None:
            raise InvalidRequest(f"model '{name}' already exists")
        spec = ModelSpec(name=name, source=SOURCE_CACHE, options={"model": ""},
                         aliases=(reference,) if reference != name else ())
        record = self.registry.add_downloading(spec)
        cancelled = threading.Event()
        task = asyncio.create_task(self._run(record, plan, cancelled), name=f"download-{name}")
        self._active[name] = (task, cancelled)
        self._plans[name] = plan
        return name

    async def cancel(self, name: str) -> None:
        """Stop a download and wait until its partial files are gone."""
        active = self._active.get(name)
        if active is None:
            return
        task, cancelled = active
        cancelled.set()
        await asyncio.wait({task}, timeout=CANCEL_WAIT_S)

    async def cancel_all(self) -> None:
        await asyncio.gather(*(self.cancel(name) for name in list(self._active)))

    async def _run(self, record: ModelRecord, plan: DownloadPlan, cancelled: threading.Event) -> None:
        loop = asyncio.get_running_loop()
        new_files: list[str] = []  # this download's files that were not in the cache before it
        etags: list[str] = []
        progress: dict[str, dict[str, int]] = {f: {"done": 0, "total": 0} for f in plan.files}
        last_sent = [0.0]

        def publish() -> None:
            self.registry.events.publish(record.name, "download_progress", {"progress": progress})

        def on_update(file_name: str, done: int, total: int | None) -> None:  # a worker thread
            progress[file_name] = {"done": done, "total": total or 0}
            now = time.monotonic()
            if now - last_sent[0] >= PROGRESS_INTERVAL_S:
                last_sent[0] = now
                loop.call_soon_threadsafe(publish)

        try:
            paths: dict[str, str] = {}
            for file_name in plan.files:
                cached = await asyncio.to_thread(try_to_load_from_cache, plan.repo_id, file_name)
                if not isinstance(cached, str):
                    new_files.append(file_name)
                    etags.append(await asyncio.to_thread(self._etag_of, plan.repo_id, file_name))
                paths[file_name] = await asyncio.to_thread(
                    hf_hub_download, plan.repo_id, file_name, token=self.token,
                    tqdm_class=_progress_class(file_name, on_update, cancelled))
                if cancelled.is_set():
                    raise DownloadCancelled()
            publish()
            options: dict[str, str | bool] = {"model": paths[plan.main_file]}
            if plan.projector:
                options["mmproj"] = paths[plan.projector]
            self.registry.finish_download(record, dataclasses.replace(record.spec, options=options))
            self.registry.events.publish(record.name, "download_finished", {})
            log.info("downloaded %s (%s)", record.name, ", ".join(plan.files))
        except BaseException as exc:
            reason = "cancelled" if isinstance(exc, DownloadCancelled) or cancelled.is_set() else str(exc)
            log.warning("download of %s failed: %s", record.name, reason)
            await self.clean_up_after(record, plan, new_files, etags)
            self.registry.drop_download(record)
            self.registry.events.publish(record.name, "download_failed", {"error": reason})
            if not isinstance(exc, Exception):
                raise
        finally:
            self._active.pop(record.name, None)
            self._plans.pop(record.name, None)


def _in_use(registry: Registry, but: ModelRecord) -> set[str]:
    return {str(value) for other in registry.records.values() if other is not but
            for key, value in other.spec.options.items() if key in ("model", "mmproj")}


def hub_error(context: str, exc: BaseException) -> RouterError:
    """What a user should get back for a failed call to the hub."""
    first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
    message = f"{context}: {first_line}"
    if isinstance(exc, RepositoryNotFoundError | RevisionNotFoundError | EntryNotFoundError | ValueError):
        return InvalidRequest(message)
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return GatewayTimeout(message)
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else 502
        return InvalidRequest(message) if 400 <= status < 500 else UpstreamFailed(message)
    return UpstreamFailed(message)  # the hub could not be reached or answered nonsense


def _progress_class(file_name: str, on_update: Any, cancelled: threading.Event) -> type[tqdm]:
    """A silent tqdm that reports each update and aborts the download once cancelled."""

    class Progress(tqdm):  # type: ignore[type-arg]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            on_update(file_name, int(self.n), int(self.total) if self.total else None)

        def update(self, n: float | None = 1) -> bool | None:
            if cancelled.is_set():
                raise DownloadCancelled()
            self.n += n or 0
            on_update(file_name, int(self.n), int(self.total) if self.total else None)
            return None

    return Progress

