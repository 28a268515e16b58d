"""Prometheus metrics: HTTP requests from this process, queue and job figures from Redis.

Job outcomes and durations are counted by the workers in Redis (see
`Keys.OUTCOMES`, `Keys.durations`) so every API replica reports the same totals.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from rq import Queue
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.serving import hung_up
from latentd.contract import BATCH_BUCKETS, DURATION_BUCKETS, Keys
from latentd.store import as_text

if TYPE_CHECKING:
    from app.serving import GenerationService

log = logging.getLogger("latentd.api")


class RedisCollector(Collector):
    def __init__(self, service: GenerationService) -> None:
        self.service = service

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        try:
            yield from self._collect()
        except redis.RedisError as exc:
            log.warning("metrics_redis_unavailable error=%s", type(exc).__name__)
            up = GaugeMetricFamily("latentd_redis_up", "1 when Redis answered this scrape.")
            up.add_metric([], 0)
            yield up

    def _collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        r = self.service.redis
        live = {m.id: m.workers for m in self.service.models()}
        # Every model with jobs waiting, served or not: one whose last worker is gone must show
        # `latentd_workers 0` beside its queue (the LatentdNoWorkers alert), not vanish.
        prefix = Queue.redis_queue_namespace_prefix + Keys.queue_name("")
        keys = [as_text(k) for k in r.smembers(Queue.redis_queues_keys)]
        queued = [k.removeprefix(prefix) for k in keys if k.startswith(prefix)]  # not other apps' queues
        candidates = sorted({*live, self.service.settings.default_model, *(q for q in queued if q)})
        pipe = r.pipeline(transaction=False)
        for name in candidates:
            pipe.llen(self.service.queue(name).key)
        lengths = dict(zip(candidates, pipe.execute(), strict=True))
        names = [n for n in candidates if n in live or n == self.service.settings.default_model or lengths[n]]
        depth = GaugeMetricFamily("latentd_queue_depth", "Jobs waiting per model.", labels=["model"])
        workers = GaugeMetricFamily("latentd_workers", "Live workers per model.", labels=["model"])
        for name in names:
            depth.add_metric([name], lengths[name])
            workers.add_metric([name], live.get(name, 0))
        yield depth
        yield workers

        outcomes = CounterMetricFamily(
            "latentd_jobs", "Jobs ended, by model, status and error code.", labels=["model", "status", "code"]
        )
        for field, count in r.hgetall(Keys.OUTCOMES).items():
            model, status, code = as_text(field).split("|", 2)
            outcomes.add_metric([model, status, code], float(count))
        yield outcomes

        durations = HistogramMetricFamily(
            "latentd_job_duration_seconds", "Time jobs spent running in a worker.", labels=["model"]
        )
        batches = HistogramMetricFamily(
            "latentd_batch_images", "Images per pipeline call (micro-batching).", labels=["model"]
        )
        splits = CounterMetricFamily(
            "latentd_out_of_memory_splits",
            "Pipeline calls split in two after an out-of-memory error.",
            labels=["model"],
        )
        for name in names:
            pipe = r.pipeline(transaction=False)
            pipe.hgetall(Keys.durations(name))
            pipe.hgetall(Keys.batches(name))
            timed, batched = ({as_text(k): float(v) for k, v in h.items()} for h in pipe.execute())
            _add_histogram(durations, name, timed, DURATION_BUCKETS)
            if _add_histogram(batches, name, batched, BATCH_BUCKETS):
                splits.add_metric([name], batched.get("oom_splits", 0.0))
        yield durations
        yield batches
        yield splits

        up = GaugeMetricFamily("latentd_redis_up", "1 when Redis answered this scrape.")
        up.add_metric([], 1)
        yield up


def _add_histogram(
    family: HistogramMetricFamily, model: str, raw: dict[str, float], bounds: tuple[float, ...]
) -> bool:
    """Add a histogram the workers keep as a Redis hash (worker/jobs.py `_observe`); False when empty."""
    if not raw:
        return False
    buckets = [(str(float(b)), raw.get(str(b), 0.0)) for b in bounds]
    buckets.append(("+Inf", raw.get("count", 0.0)))
    family.add_metric([model], buckets, raw.get("sum", 0.0))
    return True


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "latentd_http_requests",
            "HTTP requests by method, route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "latentd_http_request_duration_seconds",
            "HTTP request latency by route.",
            ["route"],
            registry=self.registry,
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0, 120.0),
        )
        # A bug's count apart from the 5xx that answer on purpose (a job's failure, Redis down).
        self.internal_errors = Counter(
            "latentd_internal_errors",
            "Requests answered internal_error: an exception nothing handled (the log has it).",
            registry=self.registry,
        )

    def watch_redis(self, service: GenerationService) -> None:
        self.registry.register(RedisCollector(service))


class MetricsMiddleware:
    """Counts requests by route template (not raw path, which would explode cardinality)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        gone = hung_up(scope)

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                # An answer to a client that hung up (a held read's end, a sync image request's
                # 504) is never sent: counted as nginx does, 499, not as the status it would have had.
                status = 499 if gone() else message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = _route_template(scope)
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


def _route_template(scope: Scope) -> str:
    matched = scope.get("route")  # set by FastAPI's router once it matched
    if matched is not None:
        return str(getattr(matched, "path", "other"))
    # Answered before routing (a body over the limit): the route that would have taken it.
    app = scope.get("app")
    for route in _routes(getattr(getattr(app, "router", None), "routes", [])):
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return str(getattr(route, "path", "other"))
    return "unmatched"


def _routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """Every route, those of included routers too: FastAPI keeps an included router whole (its
    `_IncludedRouter` has no path of its own) rather than copying its routes into the app's."""
    for route in routes:
        included = getattr(route, "original_router", None)
        yield from _routes(included.routes) if included is not None else (route,)
