"""The router's GET /metrics: its own counters, plus every running child's metrics labelled by model.

Besides modelyard's `modelyard_router_*` families, the router serves llama.cpp's router lifecycle
gauges (the names of llama.cpp PR #25330; the llama-server build probed here answers a plain
GET /metrics with a 400 and has none of them), each labelled `model`:
`llamacpp_router:model_up` (1 while its process runs: loading, loaded or sleeping),
`llamacpp_router:model_loaded` (1 while it is loaded and awake) and
`llamacpp_router:model_last_used_seconds` (Unix time of its last request, 0 before any).

Children are asked only while they are loaded or sleeping (a child's /metrics does not wake it),
so a scrape never loads or wakes a model. Their families are merged by name, each sample with a
`model` label, so the output stays valid Prometheus text.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from router.model_record import ModelRecord
from router.model_status import ModelStatus
from router.upstream_client import UpstreamClient, UpstreamError

log = logging.getLogger(__name__)

CHILD_SCRAPE_TIMEOUT_S = 2.0


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.loads = Counter("modelyard_router_loads", "Children spawned", ["model"], registry=self.registry)
        self.load_seconds = Histogram("modelyard_router_load_duration_seconds", "Spawn to ready",
                                      ["model"], registry=self.registry,
                                      buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300))
        self.crashes = Counter("modelyard_router_crashes", "Children that exited with a non-zero code",
                               ["model"], registry=self.registry)
        self.requests = Counter("modelyard_router_requests", "Proxied requests by answer status",
                                ["model", "code"], registry=self.registry)
        self.proxied_bytes = Counter("modelyard_router_proxied_bytes", "Response bytes relayed from children",
                                     ["model"], registry=self.registry)
        # labels() takes a lock and builds a key on every call; a proxied request counts twice.
        self._answered: dict[tuple[str, int], Any] = {}
        self._relayed: dict[str, Any] = {}

    def count_answer(self, model: str, status: int, relayed_bytes: int) -> None:
        """One proxied request: the status it was answered with (502 when the child failed)."""
        counter = self._answered.get((model, status))
        if counter is None:
            counter = self._answered[(model, status)] = self.requests.labels(model, str(status))
        counter.inc()
        self.count_relayed(model, relayed_bytes)

    def count_relayed(self, model: str, relayed_bytes: int) -> None:
        if relayed_bytes:
            counter = self._relayed.get(model)
            if counter is None:
                counter = self._relayed[model] = self.proxied_bytes.labels(model)
            counter.inc(relayed_bytes)

    def on_transition(self, record: ModelRecord, old: ModelStatus, new: ModelStatus, exit_code: int | None,
                      load_seconds: float | None) -> None:
        if new == ModelStatus.LOADING and old != ModelStatus.LOADING:
            self.loads.labels(record.name).inc()
        elif new == ModelStatus.LOADED and old == ModelStatus.LOADING and load_seconds is not None:
            self.load_seconds.labels(record.name).observe(load_seconds)
        elif new == ModelStatus.UNLOADED and exit_code not in (None, 0):
            self.crashes.labels(record.name).inc()

    def watch(self, records: dict[str, ModelRecord], queue_length: Callable[[], int],
              evictions: Callable[[], int]) -> None:
        self.registry.register(_LiveCollector(records, queue_length, evictions))

    def watch_conversations(self, entries: Callable[[], int], size_bytes: Callable[[], int]) -> None:
        self.registry.register(_ConversationCollector(entries, size_bytes))

    async def render(self, records: Iterable[ModelRecord], client: UpstreamClient) -> bytes:
        own = generate_latest(self.registry)
        # The local children's own metrics (a peer's and a remote server's are theirs to serve).
        running = [r for r in records if r.is_local and r.status.can_serve and r.upstream is not None]
        texts = await asyncio.gather(*(_scrape(client, r) for r in running))
        merged: dict[str, Metric] = {}
        for record, text in zip(running, texts, strict=True):
            if not text:
                continue
            try:
                families = list(text_string_to_metric_families(text))
            except ValueError as exc:
                log.warning("[%s] unreadable /metrics: %s", record.name, exc)
                continue
            for family in families:
                target = merged.get(family.name)
                if target is None:
                    target = merged[family.name] = Metric(family.name, family.documentation, family.type)
                for sample in family.samples:
                    target.add_sample(sample.name, {**sample.labels, "model": record.name}, sample.value,
                                      sample.timestamp, sample.exemplar)
        if not merged:
            return own
        children = CollectorRegistry(auto_describe=False)
        children.register(_StaticCollector(list(merged.values())))
        return own + generate_latest(children)


async def _scrape(client: UpstreamClient, record: ModelRecord) -> str:
    to = record.upstream
    assert to is not None
    try:
        status, body = await client.fetch("GET", to.host, to.port, "/metrics", CHILD_SCRAPE_TIMEOUT_S)
    except (UpstreamError, TimeoutError):
        return ""
    return body.decode("utf-8", errors="replace") if status == 200 else ""


class _StaticCollector(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


class _LiveCollector(Collector):
    """Read from the registry at scrape time."""

    def __init__(self, records: dict[str, ModelRecord], queue_length: Callable[[], int],
                 evictions: Callable[[], int]) -> None:
        self.records = records
        self.queue_length = queue_length
        self.evictions = evictions

    def collect(self) -> Iterator[Metric]:
        # One series per upstream: a peer's model is `name@peer`, with the peer in `peer` ("" here).
        status = GaugeMetricFamily("modelyard_router_model_status", "1 for each model's current status",
                                   labels=["model", "status", "peer"])
        in_flight = GaugeMetricFamily("modelyard_router_in_flight", "Requests holding a model",
                                      labels=["model", "peer"])
        up = GaugeMetricFamily("llamacpp_router:model_up", "1 while the model's process runs", labels=["model"])
        loaded = GaugeMetricFamily("llamacpp_router:model_loaded", "1 while the model is loaded",
                                   labels=["model"])
        last_used = GaugeMetricFamily("llamacpp_router:model_last_used_seconds",
                                      "Unix time of the model's last request (0: none yet)", labels=["model"])
        for record in list(self.records.values()):
            peer = record.spec.peer
            for value in ModelStatus:
                status.add_metric([record.name, str(value), peer], 1.0 if record.status == value else 0.0)
            in_flight.add_metric([record.name, peer], record.in_flight)
            up.add_metric([record.name], 1.0 if record.status.is_running else 0.0)
            loaded.add_metric([record.name], 1.0 if record.status == ModelStatus.LOADED else 0.0)
            last_used.add_metric([record.name], round(record.last_used_wall, 3))
        yield status
        yield in_flight
        yield up
        yield loaded
        yield last_used
        yield GaugeMetricFamily("modelyard_router_queue_length", "Loads waiting for room",
                                value=self.queue_length())
        yield CounterMetricFamily("modelyard_router_evictions", "Models unloaded to make room",
                                  value=self.evictions())


class _ConversationCollector(Collector):
    def __init__(self, entries: Callable[[], int], size_bytes: Callable[[], int]) -> None:
        self.entries = entries
        self.size_bytes = size_bytes

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("modelyard_router_conversations", "Resumable conversations the router routes",
                                value=self.entries())
        yield GaugeMetricFamily("modelyard_router_conversations_bytes", "What those entries hold, estimated",
                                value=self.size_bytes())
