"""Remote models: a preset section with `url =` names a server the router reaches but never starts.

Its status follows health checks, not loads: `loaded` while GET <check-endpoint> answers 200,
`unloaded` with the failure while it does not (the reason shows in /models and on /models/sse).
Every remote model is checked every `check-interval` seconds (5 by default), each check bounded in
time, so that a server that hangs costs one check, never the router's health. A request that
cannot connect to it marks it unreachable at once (router/replica_relay.py) until a check passes.
Never spawned, never evicted, never counted in --models-max.
"""

from __future__ import annotations

import asyncio
import logging

from router.model_record import ModelRecord
from router.model_sources import SOURCE_REMOTE, ModelSpec
from router.model_status import ModelStatus
from router.registry import Registry
from router.upstream import Upstream, bearer, parse_base_url
from router.upstream_client import UpstreamError

log = logging.getLogger(__name__)

SUPERVISE_INTERVAL_S = 0.25
CHECK_TIMEOUT_S = 5.0
MAX_CHECK_ANSWER_BYTES = 64 * 1024  # a health answer is small; a bigger one is a failed check


def remote_upstream(spec: ModelSpec) -> Upstream:
    host, port = parse_base_url(spec.remote_url, f"model [{spec.name}] url")
    return Upstream(host, port, bearer(spec.api_key, f"model [{spec.name}] api-key"),
                    spec.use_model_name or spec.served_name, another_router=True)


async def check_remote_models(registry: Registry) -> None:
    """Runs for the router's lifetime: starts each remote model's check when it is due. Reads the
    registry each time, so models a reload adds or removes are followed (or let go) at once."""
    loop = asyncio.get_running_loop()
    due: dict[ModelRecord, float] = {}
    checked_spec: dict[ModelRecord, ModelSpec] = {}  # a reload that changes a spec makes it due at once
    checking: set[ModelRecord] = set()
    while True:
        now = loop.time()
        remote = [r for r in registry.records.values() if r.spec.source == SOURCE_REMOTE]
        for record in list(due):
            if record not in remote:
                del due[record]  # removed from the sources
                checked_spec.pop(record, None)
        for record in remote:
            if record in checking or (due.get(record, 0.0) > now and checked_spec.get(record) is record.spec):
                continue
            checked_spec[record] = record.spec
            checking.add(record)
            due[record] = now + record.spec.check_interval_s
            registry.background(_check(registry, record, checking))
        await asyncio.sleep(SUPERVISE_INTERVAL_S)


async def _check(registry: Registry, record: ModelRecord, checking: set[ModelRecord]) -> None:
    try:
        await check_once(registry, record)
    finally:
        checking.discard(record)


async def check_once(registry: Registry, record: ModelRecord) -> None:
    """One health check, and the status it implies."""
    spec = record.spec
    upstream = remote_upstream(spec)
    if record.status == ModelStatus.UNLOADED and record.unreachable is None:
        registry.set_status(record, ModelStatus.LOADING, f"(checking {spec.remote_url})", elsewhere=True)
    problem = None
    try:
        status, _ = await registry.http.fetch("GET", upstream.host, upstream.port, spec.check_endpoint,
                                              CHECK_TIMEOUT_S, upstream.headers, limit=MAX_CHECK_ANSWER_BYTES)
        if status != 200:
            problem = f"{spec.remote_url}{spec.check_endpoint} answered {status}"
    except TimeoutError:
        problem = f"{spec.remote_url}{spec.check_endpoint} did not answer within {CHECK_TIMEOUT_S:g} s"
    except UpstreamError as exc:
        problem = f"{spec.remote_url}: {exc}"
    if registry.records.get(record.name) is not record or record.spec is not spec:
        return  # removed or changed by a reload meanwhile: the next check is the new spec's
    if problem is None:
        record.upstream = upstream
        if record.status != ModelStatus.LOADED or record.unreachable is not None:
            record.unreachable = None
            registry.set_status(record, ModelStatus.LOADED, f"({spec.remote_url} is healthy)",
                                info={"url": spec.remote_url}, elsewhere=True)
    else:
        if record.unreachable != problem:
            log.warning("remote model %s: %s", record.name, problem)
        record.unreachable = problem
        registry.set_status(record, ModelStatus.UNLOADED, f"({problem})", error=problem, elsewhere=True)
