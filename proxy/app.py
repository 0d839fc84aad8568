"""The proxy's ASGI application: `make_app(settings)` (agent -> proxy -> vLLM).

Routes, an allowlist: ``POST /v1/chat/completions`` and ``POST /v1/completions`` are
relayed and recorded; so are ``POST /v1/messages`` and ``POST /v1/responses``, spoken
over chat (`dialects.routes`); the other inference endpoints (models, embeddings,
tokenize, Anthropic's count_tokens) are forwarded as they are (`passthrough`); ``POST /v1/feedback``
and ``POST /v1/next_state`` take what clients tell about earlier turns;
``GET /v1/learner/status`` shows what the learner does; export, deletion and adapter
administration are in `admin`, the memory's lessons in `memory_admin`; ``GET /health``
reports the backends, the recorder and the memory, ``GET /metrics`` the same and more for
Prometheus (`metrics`); the dashboard is ``/ui/`` and its data ``/v1/dashboard/``
(`dashboard`). Anything else, vLLM's own administration included, is a 404 from the proxy
and never reaches vLLM. Every answer is counted and timed (`metrics.MetricsMiddleware`,
outermost); `paths.PathGuard` settles the one path every later step sees, then
`ApiKeyMiddleware` checks the client's key. The HTTP clients, the store, the recorder,
the adapter router and the memory are built in the lifespan and closed there.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import AsyncIterator

import httpx
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from nextstate.core.redact import Redactor
from nextstate.core.routing import Router
from nextstate.core.store import Store
from nextstate.proxy import admin, dashboard, memory_admin, passthrough
from nextstate.proxy.asgi import TENANT
from nextstate.proxy.dashboard.page import is_static
from nextstate.proxy.deps import Deps
from nextstate.proxy.dialects import routes as dialects
from nextstate.proxy.errors import (
    InvalidRequest,
    NotFound,
    ProxyError,
    StoreUnavailable,
    Unauthorized,
    send_error,
    shape_for,
)
from nextstate.proxy.feedback import post_feedback, post_next_state
from nextstate.proxy.memory import Memory
from nextstate.proxy.metrics import MetricsMiddleware, ProxyMetrics, metrics_endpoint
from nextstate.proxy.openapi import openapi_schema
from nextstate.proxy.paths import PathGuard
from nextstate.proxy.recorder import Recorder
from nextstate.proxy.relay import Generation
from nextstate.proxy.replicas import BackendPool
from nextstate.proxy.settings import ProxySettings
from nextstate.proxy.transport import UpstreamClient, UpstreamTransport
from nextstate.proxy.types import ASGIApp, Receive, Scope, Send

OPEN_PATHS = frozenset({"/health", "/openapi.json"})


class ApiKeyMiddleware:
    """Pure-ASGI check of ``Authorization: Bearer <key>`` (or ``x-api-key: <key>``, as
    Anthropic's clients send it) when the proxy has keys; the key's tenant goes into the
    scope for the endpoints."""

    def __init__(self, app: ASGIApp, tenants_by_key: dict[bytes, str],
                 admin_key: str | None) -> None:
        self.app = app
        self.tenants_by_key = tenants_by_key
        self.admin_key = admin_key.encode() if admin_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guarded = self.tenants_by_key or self.admin_key
        if not guarded or scope["type"] != "http" or scope["path"] in OPEN_PATHS or is_static(
                scope["path"]):
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        token = given[7:] if given[:7].lower() == b"bearer " else next(
            (v for k, v in scope["headers"] if k == b"x-api-key"), b"")
        if self.admin_key is not None and hmac.compare_digest(token, self.admin_key):
            scope[admin.ADMIN] = True
            await self.app(scope, receive, send)
            return
        tenant = None
        for key, name in self.tenants_by_key.items():
            if hmac.compare_digest(token, key):
                tenant = name
        if tenant is None:
            await send_error(send, Unauthorized("Missing or invalid API key for the proxy."),
                             shape_for(scope["path"]))
            return
        scope[TENANT] = tenant
        await self.app(scope, receive, send)


async def health(request: Request) -> Response:
    deps: Deps = request.state.deps
    oks = await asyncio.gather(*(b.vllm.health(timeout=2.0) for b in deps.backends.backends))
    found = [{"url": b.url, "ok": ok} for b, ok in zip(deps.backends.backends, oks,
                                                       strict=True)]
    up = any(b["ok"] for b in found)
    body = {
        "status": "ok" if all(b["ok"] for b in found) else "degraded" if up else "down",
        "backend": found[0], "backends": found,
        "recorder": deps.recorder.snapshot() if deps.settings.record else None,
        "memory": deps.memory.snapshot() if deps.memory is not None else None,
    }
    return Response(orjson.dumps(body), status_code=200 if up else 503,
                    media_type="application/json")


async def openapi(request: Request) -> Response:
    return Response(orjson.dumps(openapi_schema()), media_type="application/json")


async def learner_status(request: Request) -> Response:
    """What the learner is doing (it writes its state to the store)."""
    deps: Deps = request.state.deps
    try:
        status = await asyncio.to_thread(deps.store.status.read)
    except Exception as exc:
        raise StoreUnavailable(f"the store cannot be read ({type(exc).__name__})") from exc
    body = {"object": "nextstate.learner_status", "policy": deps.settings.policy,
            "serving": deps.router.current, "serving_personal": deps.router.personal,
            "learner": status}
    return Response(orjson.dumps(body), media_type="application/json")


def _error_response(request: Request, exc: ProxyError) -> Response:
    return Response(exc.body(shape_for(request.scope["path"])), status_code=exc.status,
                    media_type="application/json")


async def _proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    return _error_response(request, exc)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    path = request.scope["path"]
    if exc.status_code == 404:
        return _error_response(request, NotFound(
            f"No route for {path}: the proxy serves the inference endpoints (chat, "
            "completions, responses, messages, models, embeddings, tokenize) and its own."))
    if exc.status_code == 405:
        return _error_response(request, InvalidRequest(
            f"Method {request.method} is not allowed on {path}."))
    return _error_response(request, InvalidRequest(str(exc.detail)))


def make_app(settings: ProxySettings, *, transport: httpx.AsyncBaseTransport | None = None,
             ) -> Starlette:
    """Build the proxy. ``transport`` replaces the network (tests use a MockTransport)."""
    metrics = ProxyMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Deps]]:
        def make_client(url: str) -> httpx.AsyncClient:
            # One pool of keep-alive connections per backend (proxy/transport.py), each
            # idle one dropped before vLLM's own keep-alive timeout (uvicorn's 5 s) ends it.
            return UpstreamClient(
                base_url=url,
                transport=transport or UpstreamTransport(max_idle=256, keepalive_expiry=4.0),
                timeout=httpx.Timeout(settings.upstream_timeout,
                                      connect=settings.upstream_connect_timeout))

        backends = BackendPool(settings.backends, make_client, settings.backend_api_key)
        store = Store(settings.resolved_store_url(), busy_timeout=settings.sqlite_busy_timeout,
                      redactor=Redactor(settings.redact_patterns))
        recorder = Recorder(store, settings.resolved_spool_dir(),
                            queue_size=settings.queue_size,
                            idle_seconds=settings.session_idle_seconds,
                            pairing_wait=settings.pairing_wait_seconds,
                            retention_days=settings.retention_days,
                            sync_interval=settings.journal_sync_seconds)
        recorder.start()
        router = Router(settings.policy, settings.base_model, store)
        tasks = []
        memory = None
        if settings.memory.enabled:
            memory = Memory(settings.memory, store, settings.policy)
            tasks.append(asyncio.create_task(memory.follow()))
        if settings.policy:
            tasks.append(asyncio.create_task(router.follow(settings.adapter_poll_seconds)))
        if settings.policy or len(backends.backends) > 1:
            tasks.append(asyncio.create_task(backends.watch(
                router, min(settings.health_interval_seconds,
                            settings.adapter_poll_seconds * 4))))
        deps = Deps(settings, backends, recorder, store, router, metrics, memory)
        metrics.watch(deps)
        try:
            yield {"deps": deps}
        finally:
            metrics.unwatch()
            for task in tasks:
                task.cancel()
            await recorder.stop()
            await backends.aclose()
            store.close()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", Generation("chat", "/v1/chat/completions"),
                  methods=["POST"]),
            Route("/v1/completions", Generation("completions", "/v1/completions"),
                  methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            Route("/v1/feedback", post_feedback, methods=["POST"]),
            Route("/v1/next_state", post_next_state, methods=["POST"]),
            Route("/v1/learner/status", learner_status, methods=["GET"]),
            Route("/v1/export", admin.export, methods=["GET"]),
            Route("/v1/sessions/{session_id}", admin.delete_session, methods=["DELETE"]),
            Route("/v1/tenants/{tenant}", admin.delete_tenant, methods=["DELETE"]),
            Route("/v1/adapters", admin.list_adapters, methods=["GET"]),
            Route("/v1/adapters/rollback", admin.rollback, methods=["POST"]),
            *memory_admin.routes(),
            *dialects.routes(),
            *passthrough.routes(),
            *dashboard.routes(),
        ],
        exception_handlers={HTTPException: _http_exception, ProxyError: _proxy_error},
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False  # a trailing slash is a 404, not a redirect
    app.add_middleware(ApiKeyMiddleware, tenants_by_key=settings.tenants_by_key(),
                       admin_key=settings.admin_key)
    app.add_middleware(PathGuard)  # before the key check
    # Added last: the outermost, so that refusals (a bad path, a wrong key) are counted.
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=app.routes)
    return app
