"""The child's /metrics: Prometheus text, read from the scheduler at scrape time.

A collector (not counters bumped on the hot path) so the decode loop pays nothing for metrics.
Names follow llama-server's `llamacpp:` metrics where one exists, so existing dashboards work.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from child.protocol import ChildState
from child.runtime import ChildRuntime


class EngineCollector(Collector):
    def __init__(self, runtime: ChildRuntime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        runtime = self.runtime
        scheduler = runtime.scheduler
        yield GaugeMetricFamily("modelyard:is_sleeping", "1 while the model's weights are released",
                                value=1.0 if runtime.state == ChildState.SLEEPING else 0.0)
        yield GaugeMetricFamily("modelyard:is_loading", "1 while the model is loading",
                                value=1.0 if scheduler is None else 0.0)
        if scheduler is None:
            return
        stats = scheduler.stats
        yield CounterMetricFamily("llamacpp:prompt_tokens", "Prompt tokens processed (cache hits excluded)",
                                  value=stats.prompt_tokens_total)
        yield CounterMetricFamily("llamacpp:tokens_predicted", "Tokens generated",
                                  value=stats.generated_tokens_total)
        yield CounterMetricFamily("llamacpp:n_decode", "llama_decode calls", value=stats.decode_calls_total)
        yield CounterMetricFamily("modelyard:requests", "Requests started in a slot", value=stats.requests_total)
        yield CounterMetricFamily("modelyard:sequences_sampled", "Sum over decode calls of the sequences sampled",
                                  value=stats.sequences_decoded_total)
        yield CounterMetricFamily("modelyard:decode_seconds", "Seconds spent decoding and sampling",
                                  value=stats.decode_seconds_total)
        yield CounterMetricFamily("modelyard:embedding_inputs", "Embedding inputs computed",
                                  value=stats.embedding_inputs_total)
        yield GaugeMetricFamily("modelyard:embedding_inputs_queued", "Embedding inputs waiting to be computed",
                                value=scheduler.embedding_inputs_queued())
        busy = scheduler.busy_slots()
        yield GaugeMetricFamily("llamacpp:requests_processing", "Requests in a slot", value=busy)
        yield GaugeMetricFamily("llamacpp:requests_deferred", "Requests waiting for a slot",
                                value=scheduler.queued())
        yield GaugeMetricFamily("modelyard:slots_busy", "Slots generating", value=busy)
        yield GaugeMetricFamily("modelyard:slots_total", "Slots (-np)", value=scheduler.n_parallel)
        yield GaugeMetricFamily("modelyard:kv_cells_used", "KV cache cells holding tokens",
                                value=scheduler.kv_cells_used())
        yield GaugeMetricFamily("modelyard:kv_cells_total", "KV cache cells",
                                value=scheduler.n_ctx_slot * scheduler.n_parallel)
        per_second = (stats.generated_tokens_total / stats.decode_seconds_total
                      if stats.decode_seconds_total else 0.0)
        yield GaugeMetricFamily("llamacpp:predicted_tokens_seconds",
                                "Generated tokens per second of decoding (all slots together)", value=per_second)
        per_decode = (stats.sequences_decoded_total / stats.decode_calls_total if stats.decode_calls_total else 0.0)
        yield GaugeMetricFamily("llamacpp:n_busy_slots_per_decode", "Average sequences sampled per decode",
                                value=per_decode)


def metrics_registry(runtime: ChildRuntime) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(runtime))
    return registry
