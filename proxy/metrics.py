"""The proxy's Prometheus metrics, ``GET /metrics`` (agent -> proxy -> vLLM, counted on
the side; proxy -> store, read when scraped).

On the request path only in-memory counters and histograms (prometheus_client's, a few
microseconds a request, no I/O): `MetricsMiddleware` counts every answer by route and
status, and times it (the whole answer, and the first byte of its body). Everything else
is read when Prometheus asks: the recorder's counts (what the journal holds, what the
store refused), each backend's health (asked at that moment, as ``/health`` does) and
the adapter serving the policy. Each app has its own registry, built by `make_app`:
nothing is global, and two apps in one process (the tests) count apart.

    nextstate_proxy_requests_total{route,status}          answers, by route template
    nextstate_proxy_request_duration_seconds{route}       until the answer's last byte
    nextstate_proxy_time_to_first_byte_seconds{route}     until its body's first byte
    nextstate_proxy_requests_in_progress
    nextstate_recorder_{submitted,logged,written,spooled,dropped,rejected,
                        store_errors}_total, nextstate_recorder_{spool_pending,queued}
    nextstate_backend_up{backend}                         1: GET /health answers 200
    nextstate_proxy_serving_info{policy,adapter}          the version serving the policy
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match

from nextstate.proxy.admin import require_admin
from nextstate.proxy.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:  # (Deps holds the app's ProxyMetrics)
    from nextstate.proxy.deps import Deps

# Seconds: from a cached 1 ms answer to a long generation.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0, 300.0)
OTHER = "other"  # a path no route serves (its own label would be unbounded)
RECORDER_COUNTS = (
    ("submitted", "Turns and feedback handed to the recorder"),
    ("logged", "Records appended to the journal on the request path"),
    ("written", "Records written to the store"),
    ("spooled", "Records that waited in the journal for a store that failed"),
    ("dropped", "Records lost: neither the journal nor memory could take them"),
    ("rejected", "Records no store could take, set aside in rejected-*.jsonl"),
    ("store_errors", "Failed writes to the store (retried)"),
)


class ProxyMetrics:
    """One app's registry: what the middleware counts, and what a scrape reads."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("nextstate_proxy_requests", "Answers, by route and status",
                                ["route", "status"], registry=self.registry)
        self.duration = Histogram("nextstate_proxy_request_duration_seconds",
                                  "Time until the answer's last byte", ["route"],
                                  buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttfb = Histogram("nextstate_proxy_time_to_first_byte_seconds",
                              "Time until the first byte of the answer's body", ["route"],
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_progress = Gauge("nextstate_proxy_requests_in_progress",
                                 "Requests being answered", registry=self.registry)
        # Labelled children, looked up once (``.labels()`` takes a lock and builds a key).
        self._counted: dict[tuple[str, int], Any] = {}
        self._timed: dict[str, tuple[Any, Any]] = {}
        self._live: _Live | None = None

    def observe(self, route: str, status: int, started: float, first_byte: float | None,
                ended: float) -> None:
        counted = self._counted.get((route, status))
        if counted is None:
            counted = self._counted[(route, status)] = self.requests.labels(route, str(status))
        counted.inc()
        timed = self._timed.get(route)
        if timed is None:
            timed = self._timed[route] = (self.duration.labels(route), self.ttfb.labels(route))
        timed[0].observe(ended - started)
        if first_byte is not None:
            timed[1].observe(first_byte - started)

    def watch(self, deps: Deps) -> None:
        """Read the recorder, the backends and the router at each scrape (the lifespan
        calls this once they exist; `unwatch` when they close)."""
        self._live = _Live(deps)
        self.registry.register(self._live)

    def unwatch(self) -> None:
        if self._live is not None:
            self.registry.unregister(self._live)
            self._live = None

    def exposition(self, backends_up: dict[str, bool]) -> bytes:
        if self._live is not None:
            self._live.backends_up = backends_up
        return generate_latest(self.registry)


class _Live(Collector):
    """What a scrape reads from the running proxy (nothing on the request path)."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self.backends_up: dict[str, bool] = {}

    def collect(self) -> Iterable[Metric]:
        snapshot = self.deps.recorder.snapshot()
        for name, about in RECORDER_COUNTS:
            yield CounterMetricFamily(f"nextstate_recorder_{name}", about,
                                      value=snapshot[name])
        yield GaugeMetricFamily("nextstate_recorder_spool_pending",
                                "Records in the journal not yet in the store",
                                value=snapshot["spool_pending"])
        yield GaugeMetricFamily("nextstate_recorder_queued",
                                "Records only in memory (the journal could not take them)",
                                value=snapshot["queued"])
        up = GaugeMetricFamily("nextstate_backend_up", "1 when the vLLM backend answers "
                               "GET /health with 200", labels=["backend"])
        for backend in self.deps.backends.backends:
            up.add_metric([backend.url], float(self.backends_up.get(backend.url,
                                                                    backend.healthy)))
        yield up
        serving = GaugeMetricFamily("nextstate_proxy_serving_info", "The adapter version "
                                    "the policy's requests go to", labels=["policy", "adapter"])
        router = self.deps.router
        if router.policy is not None:
            serving.add_metric([router.policy, router.current or router.base_model or ""], 1.0)
        yield serving


class _Answer:
    """One request's answer as it goes out: its status and when its body began."""

    __slots__ = ("send", "status", "first_byte")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.status = 500  # an exception before the answer started: the server's 500
        self.first_byte: float | None = None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif self.first_byte is None and message["type"] == "http.response.body":
            self.first_byte = time.perf_counter()
        await self.send(message)


class MetricsMiddleware:
    """Pure-ASGI, outermost: counts and times every HTTP answer by the route that served
    it (or would have: a request refused before routing, for its key, is matched against
    the routes afterwards)."""

    def __init__(self, app: ASGIApp, metrics: ProxyMetrics, routes: Sequence[BaseRoute],
                 ) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        answer = _Answer(send)
        self.metrics.in_progress.inc()
        try:
            await self.app(scope, receive, answer)
        finally:
            self.metrics.in_progress.dec()
            self.metrics.observe(self._route(scope), answer.status, started,
                                 answer.first_byte, time.perf_counter())

    def _route(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is None:
            route = next((r for r in self.routes if r.matches(scope)[0] == Match.FULL), None)
        path = getattr(route, "path", None)
        return path if isinstance(path, str) else OTHER


async def metrics_endpoint(request: Request) -> Response:
    """``GET /metrics`` (the admin key, when the proxy has keys)."""
    deps = require_admin(request)
    backends = deps.backends.backends
    ups = await asyncio.gather(*(b.vllm.health(timeout=2.0) for b in backends))
    body = deps.metrics.exposition({b.url: ok for b, ok in zip(backends, ups, strict=True)})
    return Response(body, media_type=CONTENT_TYPE_LATEST)
