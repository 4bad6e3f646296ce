"""``/metrics``: the server's state in the Prometheus text format (``prometheus_client``, one registry per app).

Gauges and counters are read from the engine loop when scraped (queue length, running sequences, tokens/s,
prefix-cache hit rate, memory); latency histograms (time to first token, inter-token latency, end to end) are
observed by the request handlers as tokens reach them.
"""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from olmo_hybrid.serve.scheduler import EngineLoop

PREFIX = "olmo_hybrid_"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                   40.96, 81.92)


class _EngineCollector:
    def __init__(self, loop: EngineLoop):
        self.loop = loop

    def collect(self):
        loop, engine = self.loop, self.loop.engine
        running = engine.num_running

        def family(cls, name, doc, value, labels=None):
            metric = cls(PREFIX + name, doc, labels=list(labels) if labels else None)
            for key, v in (value.items() if labels else [((), value)]):
                metric.add_metric([key] if labels else [], v)
            return metric

        def gauge(name, doc, value, labels=None):
            return family(GaugeMetricFamily, name, doc, value, labels)

        def counter(name, doc, value, labels=None):
            return family(CounterMetricFamily, name, doc, value, labels)

        yield gauge("queue_length", "requests waiting for a free slot", max(0, loop.in_flight - running))
        yield gauge("running_sequences", "requests holding a cache slot (prefilling or decoding)", running)
        yield gauge("slots", "cache slots (the most sequences decoded together)", engine.max_batch)
        yield gauge("generation_tokens_per_second", "generated tokens per second over the recent window",
                    loop.tokens_per_second())
        yield counter("prompt_tokens", "prompt tokens of accepted requests", loop.prompt_tokens)
        yield counter("generation_tokens", "generated tokens", loop.generated_tokens)
        yield counter("requests_finished", "finished requests by reason", dict(loop.finished) or {"stop": 0},
                      labels=("reason",))
        yield counter("engine_step_errors", "engine steps that raised (their requests failed)", loop.step_errors)
        pc = engine.prefix_cache
        if pc is not None:
            yield gauge("prefix_cache_hit_rate", "prompt tokens restored from the prefix cache / tokens looked up",
                        pc.stats.hit_rate)
            yield counter("prefix_cache_queried_tokens", "prompt tokens looked up in the prefix cache",
                          pc.stats.queried_tokens)
            yield counter("prefix_cache_hit_tokens", "prompt tokens restored from the prefix cache",
                          pc.stats.hit_tokens)
            yield gauge("prefix_cache_blocks", "prefix cache blocks", {"used": pc.used_blocks, "total": pc.num_blocks},
                        labels=("state",))
        report = engine.memory_report()
        memory = {"weights": report["weight_bytes"], "kv_and_state_cache": report["cache_bytes"],
                  "prefix_cache": report["prefix_cache_bytes"]}
        if engine.device.type == "cuda":
            memory["device_allocated"] = torch.cuda.memory_allocated(engine.device)
            memory["device_reserved"] = torch.cuda.memory_reserved(engine.device)
            memory["device_peak_allocated"] = torch.cuda.max_memory_allocated(engine.device)
        yield gauge("memory_bytes", "memory by use", memory, labels=("kind",))


class ServerMetrics:
    """The registry of one app: the engine collector plus latency histograms."""

    def __init__(self, loop: EngineLoop):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(loop))
        hist = dict(registry=self.registry, buckets=LATENCY_BUCKETS)
        self.time_to_first_token = Histogram(PREFIX + "time_to_first_token_seconds",
                                             "from request arrival to its first token", **hist)
        self.inter_token_latency = Histogram(PREFIX + "inter_token_latency_seconds",
                                             "between consecutive tokens of a request", **hist)
        self.request_latency = Histogram(PREFIX + "request_latency_seconds", "from arrival to the end of a request",
                                         **hist)

    def render(self) -> bytes:
        return generate_latest(self.registry)
