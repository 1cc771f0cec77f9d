"""Prometheus metrics of one server (its own registry, so several apps can coexist)."""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _EngineCollector(Collector):
    """Engine state read at scrape time from the engine's latest stats snapshot."""

    def __init__(self, stats: Callable[[], dict[str, float]], healthy: Callable[[], bool]) -> None:
        self.stats = stats
        self.healthy = healthy

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        yield _gauge("num_requests_running", "Requests in the running batch", s["num_running"])
        yield _gauge("num_requests_waiting", "Requests in the waiting queue", s["num_waiting"])
        yield _gauge("kv_cache_usage_ratio", "Fraction of KV blocks in use", s["kv_usage"])
        yield _gauge("kv_cache_free_blocks", "Free KV blocks", s["num_free_blocks"])
        query, hit = s["prefix_query_tokens"], s["prefix_hit_tokens"]
        yield _gauge("prefix_cache_hit_rate", "Prefix-cache hit tokens / queried tokens", hit / query if query else 0.0)
        yield _counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache", query)
        yield _counter("prefix_cache_hits", "Prompt tokens served from the prefix cache", hit)
        yield _counter("num_preemptions", "Requests preempted (KV freed, recomputed)", s["num_preemptions"])
        yield _gauge("weight_version", "Version of the weights being served", s["weight_version"])
        yield _gauge("healthy", "1 while the engine thread is alive", 1.0 if self.healthy() else 0.0)
        yield from _reliability_metrics(s)


# Requests the engine refused or ended early, by the stats key that counts them.
_REJECTED = {"overloaded": "num_rejected_overloaded", "invalid": "num_rejected_invalid",
             "engine_dead": "num_rejected_engine_dead", "queue_timeout": "num_queue_timeouts"}


def _reliability_metrics(s: dict[str, float]) -> Iterator[Metric]:
    """KV blocks, paused requests, open sessions and the aborted / failed / rejected counters."""
    yield _gauge("kv_cache_total_blocks", "KV blocks in the pool", s["num_total_blocks"])
    yield _gauge("kv_cache_cached_blocks", "KV blocks registered in the prefix cache", s.get("num_cached_blocks", 0))
    yield _gauge("num_requests_paused", "In-flight requests held by a pause", s.get("num_paused_requests", 0))
    if "num_open_sessions" in s:  # only once a sessions module reports them
        yield _gauge("num_open_sessions", "Open multi-turn sessions", s["num_open_sessions"])
    yield _counter("requests_aborted", "Requests finished with finish_reason abort", s.get("num_aborted", 0))
    yield _counter("requests_failed", "Requests failed inside the engine (forward, logits, detokenizer)",
                   s.get("num_failed", 0))
    rejected = CounterMetricFamily("asyncengine_requests_rejected", "Requests refused by the engine, by reason",
                                   labels=["reason"])
    for reason, key in _REJECTED.items():
        rejected.add_metric([reason], float(s.get(key, 0)))
    yield rejected
    try:  # scraped on the event loop: its live tasks (a leak shows as a climb at idle)
        yield _gauge("event_loop_tasks", "Live asyncio tasks of the server's event loop", len(asyncio.all_tasks()))
    except RuntimeError:  # rendered outside a running loop
        pass


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"asyncengine_{name}", doc, value=float(value))


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"asyncengine_{name}", doc, value=float(value))


class Metrics:
    """Request and token counters, latency histograms, and the engine's gauges."""

    def __init__(self, stats: Callable[[], dict[str, float]], healthy: Callable[[], bool]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("asyncengine_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("asyncengine_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("asyncengine_generation_tokens", "Tokens generated", registry=r)
        self.step_seconds = Histogram(
            "asyncengine_step_seconds", "Duration of one engine step", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )
        self.ttft = Histogram(
            "asyncengine_time_to_first_token_seconds", "Request arrival to first token", registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.e2e = Histogram(
            "asyncengine_e2e_request_latency_seconds", "Request arrival to last token", registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        r.register(_EngineCollector(stats, healthy))

    def observe_step(self, seconds: float, num_tokens: int, num_requests: int) -> None:
        """Engine-thread callback (prometheus-client metrics are thread-safe)."""
        self.step_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
