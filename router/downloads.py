"""GGUF models from the Hugging Face Hub, fetched in the background: POST /models, and the first
load of a preset model with `hf-repo` (llama-server's -hf / -hff).

huggingface_hub does the work (HF_ENDPOINT, the cache layout, the blobs); this module picks the
files (the quant names the GGUF, or `hf-file` names it exactly; every shard of it comes along, and
a projector file if the repo has one), reports progress on the status feed at most every 100 ms
through a tqdm class huggingface_hub accepts, and cancels on request. Both kinds of download run
the same fetch (`_fetch`): a cancelled or failed one leaves no partial file, and removes only what
it added itself: other quants of the same repository, finished or still downloading, are not its
business.

The two differ in what the model is around the fetch:
- POST /models registers a new model (source `cache`) as `downloading`; a failed or cancelled
  download drops it again.
- A preset model with `hf-repo` is in the preset all along: its first load finds the files in the
  cache without the network (`cached_files`), or else goes `unloaded -> downloading -> unloaded`
  (failed or not) and the registry's load follows a finished download. The requests waiting for
  the model wait for the download task and get its error if it fails.

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

from router.errors import GatewayTimeout, InvalidRequest, RouterError, ServerError, UpstreamFailed
from router.gguf_files import SHARD, is_main_gguf, pick_projector, quant_of, shard_files
from router.hf_cache import cached_repo_files, model_name, parse_reference, remove_unfinished_download
from router.model_record import ModelRecord
from router.model_sources import SOURCE_CACHE, ModelSpec
from router.model_status import ModelStatus
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


@dataclasses.dataclass(frozen=True)
class FetchedFiles:
    """A preset model's files in the cache."""

    model: str
    projector: str | None

    def launch_spec(self, spec: ModelSpec) -> ModelSpec:
        """The spec its child starts from: the preset's options with these files (an `mmproj` the
        preset sets itself wins over the repository's projector)."""
        options: dict[str, str | bool] = {**spec.options, "model": self.model}
        if self.projector and not options.get("mmproj"):
            options["mmproj"] = self.projector
        return dataclasses.replace(spec, options=options)


def plan_download(reference: str, repo_files: list[str], hf_file: str = "", exact: bool = False) -> DownloadPlan:
    """The files to fetch for `user/repo[:quant]`: `hf_file` when given, else the GGUF of the quant
    (Q4_K_M when none is named, or the first GGUF when the repo lacks it, unless `exact`)."""
    repo_id, quant = parse_reference(reference)
    if hf_file:
        if hf_file not in repo_files:
            raise InvalidRequest(f"repository {repo_id} has no file {hf_file}")
        main = hf_file
    else:
        candidates = sorted(f for f in repo_files if is_main_gguf(f))
        if not candidates:
            raise InvalidRequest(f"repository {repo_id} has no GGUF file")
        wanted = quant or DEFAULT_QUANT
        matching = [f for f in candidates if (quant_of(f) or "").upper() == wanted.upper()]
        if not matching and (quant or exact):
            raise InvalidRequest(f"repository {repo_id} has no GGUF file for quant {wanted} "
                                 f"(it has: {', '.join(candidates)})")
        main = (matching or candidates)[0]
    projector = pick_projector(repo_files)
    files = shard_files(main, repo_files) + ([projector] if projector else [])
    return DownloadPlan(repo_id, main, tuple(files), projector)


def cached_files(spec: ModelSpec, fetched: DownloadPlan | None = None) -> FetchedFiles | None:
    """A preset model's `hf-repo` files when the cache holds every one of them, found without the
    network (huggingface_hub's try_to_load_from_cache); None sends the load to the hub. Blocking:
    run it off the event loop. `fetched`: what this router downloaded for it before. Otherwise,
    without a quant only Q4_K_M counts as found: which GGUF the hub would pick instead is for the
    hub's listing to say."""
    repo_id, _ = parse_reference(spec.hf_repo)
    plan = fetched
    if plan is None:
        try:
            plan = plan_download(spec.hf_repo, cached_repo_files(repo_id), spec.hf_file, exact=True)
        except InvalidRequest:
            return None
        shard = SHARD.search(plan.main_file)
        shards = [f for f in plan.files if f != plan.projector]
        if shard is not None and len(shards) != int(shard.group(2)):
            return None  # a shard is missing
    paths: dict[str, str] = {}
    for file_name in plan.files:
        path = try_to_load_from_cache(plan.repo_id, file_name)
        if not isinstance(path, str):
            return None
        paths[file_name] = path
    return FetchedFiles(paths[plan.main_file], paths[plan.projector] if plan.projector else None)


@dataclasses.dataclass
class _Job:
    task: asyncio.Task[Any]
    cancelled: threading.Event
    plan: DownloadPlan | None  # None while a preset model's download still lists the repository
    then_load: bool  # a preset model's: requests wait for it, and a load follows


class Downloads:
    def __init__(self, registry: Registry, token: str | None) -> None:
        self.registry = registry
        self.token = token
        self._jobs: dict[str, _Job] = {}  # the downloads running, by model name
        # What a preset's (hf-repo, hf-file) downloaded: its files are found by that from then on,
        # even where the cache alone would not tell (a repository without the default quant).
        self._fetched: dict[tuple[str, str], DownloadPlan] = {}

    async def clean_up_after(self, record: ModelRecord, plan: DownloadPlan, new_files: list[str],
                             etags: list[str]) -> None:
        """Remove what a cancelled or failed download added: the files it found missing when it
        started, but for what another download of the repository planned too or a model already
        uses (a shared projector, say): "not in the cache when it started" is not "its own"."""
        others = [job.plan for name, job in self._jobs.items()
                  if name != record.name and job.plan is not None and job.plan.repo_id == plan.repo_id]
        planned_elsewhere = {f for other in others for f in other.files}
        await asyncio.to_thread(remove_unfinished_download, plan.repo_id,
                                [f for f in new_files if f not in planned_elsewhere], etags,
                                prune=not others, keep_paths=_in_use(self.registry, record))

    def _etag_of(self, repo_id: str, file_name: str) -> str:
        """The name of the blob a file is stored under (for cleaning up after it)."""
        return str(get_hf_file_metadata(hf_hub_url(repo_id, file_name), token=self.token).etag or "")

    async def _plan(self, reference: str, hf_file: str = "") -> DownloadPlan:
        """Ask the hub for the repository's files and pick those to fetch."""
        repo_id, _ = parse_reference(reference)
        try:
            repo_files = await asyncio.to_thread(HfApi(token=self.token).list_repo_files, repo_id)
        except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many kinds: sorted below
            raise hub_error(f"model validation failed, unable to download {reference}", exc) from exc
        return plan_download(reference, repo_files, hf_file)

    async def start(self, reference: str) -> str:
        """Validate the reference against the hub and start the download; returns the model's name."""
        try:
            parse_reference(reference)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
        plan = await self._plan(reference)
        name = model_name(plan.repo_id, plan.main_file)
        if self.registry.lookup(name) is not None or self.registry.lookup(reference) is not None:
            raise InvalidRequest(f"model '{name}' already exists")
        spec = ModelSpec(name=name, source=SOURCE_CACHE, options={"model": ""},
                         aliases=(reference,) if reference != name else ())
        record = self.registry.add_downloading(spec)
        cancelled = threading.Event()
        task = asyncio.create_task(self._run_requested(record, plan, cancelled), name=f"download-{name}")
        self._jobs[name] = _Job(task, cancelled, plan, then_load=False)
        return name

    # -- a preset model's hf-repo, on its first load ------------------------------------------------

    async def cached_files(self, spec: ModelSpec) -> FetchedFiles | None:
        return await asyncio.to_thread(cached_files, spec, self._fetched.get((spec.hf_repo, spec.hf_file)))

    def fetch_for_load(self, record: ModelRecord) -> asyncio.Task[FetchedFiles]:
        """Start downloading an `unloaded` preset model's hf-repo files: it is `downloading` when
        this returns. The task ends with the files (the model `unloaded` again, ready to load) or
        with the error to answer the requests that waited for it (a RouterError)."""
        pending = self.pending_load(record.name)
        if pending is not None:
            return pending
        self.registry.set_status(record, ModelStatus.DOWNLOADING, f"(downloading {record.spec.hf_repo})")
        cancelled = threading.Event()
        task = asyncio.create_task(self._run_for_load(record, cancelled), name=f"download-{record.name}")
        self._jobs[record.name] = _Job(task, cancelled, None, then_load=True)
        return task

    async def load_after_download(self, record: ModelRecord, download: asyncio.Task[FetchedFiles]) -> None:
        """Load a preset model once its files are downloaded, whether or not the request that
        started it still waits (as a load runs to its end when its client leaves)."""
        try:
            await asyncio.shield(download)
            if self.registry.may_start(record):
                await self.registry.start(record)
        except RouterError as exc:
            log.warning("model %s not loaded: %s", record.name, exc.message)

    def pending_load(self, name: str) -> asyncio.Task[FetchedFiles] | None:
        """The running download a load of this preset model waits for, if any."""
        job = self._jobs.get(name)
        return job.task if job is not None and job.then_load else None

    # -- both kinds ---------------------------------------------------------------------------------

    async def cancel(self, name: str) -> None:
        """Stop a download and wait until its partial files are gone."""
        job = self._jobs.get(name)
        if job is None:
            return
        job.cancelled.set()
        await asyncio.wait({job.task}, timeout=CANCEL_WAIT_S)

    async def cancel_all(self) -> None:
        await asyncio.gather(*(self.cancel(name) for name in list(self._jobs)))

    async def _run_requested(self, record: ModelRecord, plan: DownloadPlan, cancelled: threading.Event) -> None:
        """POST /models: the model exists once its download has finished."""
        try:
            paths = await self._fetch(record, plan, cancelled)
        except BaseException as exc:
            self._jobs.pop(record.name, None)
            self.registry.drop_download(record)
            self._report_failure(record, exc, cancelled)
            if not isinstance(exc, Exception):
                raise
            return
        self._jobs.pop(record.name, None)
        options: dict[str, str | bool] = {"model": paths[plan.main_file]}
        if plan.projector:
            options["mmproj"] = paths[plan.projector]
        self.registry.finish_download(record, dataclasses.replace(record.spec, options=options))
        self._report_success(record, plan)

    async def _run_for_load(self, record: ModelRecord, cancelled: threading.Event) -> FetchedFiles:
        """A preset model: it stays (unloaded) whatever happens to its download."""
        spec = record.spec
        try:
            plan = await self._plan(spec.hf_repo, spec.hf_file)
            self._jobs[record.name].plan = plan
            if cancelled.is_set():
                raise DownloadCancelled()
            paths = await self._fetch(record, plan, cancelled)
        except BaseException as exc:
            self._jobs.pop(record.name, None)
            self._report_failure(record, exc, cancelled)
            if not isinstance(exc, Exception):
                raise
            if isinstance(exc, DownloadCancelled) or cancelled.is_set():
                raise ServerError(f"model '{record.name}' was unloaded while it downloaded") from exc
            if isinstance(exc, RouterError):
                raise
            raise hub_error(f"unable to download {spec.hf_repo} for model '{record.name}'", exc) from exc
        self._jobs.pop(record.name, None)
        self._fetched[(spec.hf_repo, spec.hf_file)] = plan
        self.registry.set_status(record, ModelStatus.UNLOADED, "(download finished)")
        self._report_success(record, plan)
        return FetchedFiles(paths[plan.main_file], paths[plan.projector] if plan.projector else None)

    def _report_success(self, record: ModelRecord, plan: DownloadPlan) -> None:
        self.registry.events.publish(record.name, "download_finished", {})
        log.info("downloaded %s (%s)", record.name, ", ".join(plan.files))

    def _report_failure(self, record: ModelRecord, exc: BaseException, cancelled: threading.Event) -> str:
        """Say why on the log and the feed (a preset model goes back to `unloaded` first)."""
        cancel = isinstance(exc, DownloadCancelled) or cancelled.is_set()
        reason = "cancelled" if cancel else (str(exc).splitlines() or [type(exc).__name__])[0]
        log.warning("download of %s failed: %s", record.name, reason)
        if record.status == ModelStatus.DOWNLOADING and self.registry.records.get(record.name) is record:
            self.registry.set_status(record, ModelStatus.UNLOADED, f"(download failed: {reason})")
        self.registry.events.publish(record.name, "download_failed", {"error": reason})
        return reason

    async def _fetch(self, record: ModelRecord, plan: DownloadPlan, cancelled: threading.Event) -> dict[str, str]:
        """The plan's files into the cache (their paths by name), with progress on the feed. On
        failure or cancellation, what it added is removed again before the exception goes on."""
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
            return paths
        except BaseException:
            await self.clean_up_after(record, plan, new_files, etags)
            raise


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

