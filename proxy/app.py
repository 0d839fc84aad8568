"""The proxy's ASGI application: `make_app(settings)` (agent -> proxy -> vLLM).

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` are relayed and
recorded; ``POST /v1/feedback`` and ``POST /v1/next_state`` take what clients tell about
earlier turns; ``GET /v1/learner/status`` shows what the learner does; export, deletion
and adapter administration are in `admin`; ``GET /health`` reports the backend and the
recorder; vLLM's administrative endpoints are refused; any other ``/v1/*`` request passes
through unchanged. The HTTP client, the store, the
recorder and the adapter router are built in the lifespan and closed there.
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

from nextstate.proxy import admin
from nextstate.proxy.backends import BackendPool
from nextstate.proxy.deps import Deps
from nextstate.proxy.errors import (
    BackendUnavailable,
    Forbidden,
    InvalidRequest,
    NotFound,
    ProxyError,
    StoreUnavailable,
    Unauthorized,
)
from nextstate.proxy.feedback import post_feedback, post_next_state
from nextstate.proxy.openapi import openapi_schema
from nextstate.proxy.recorder import Recorder
from nextstate.proxy.redact import Redactor
from nextstate.proxy.relay import (
    TENANT,
    Generation,
    downstream_headers,
    read_body,
    send_error,
    until_disconnect,
    upstream_headers,
)
from nextstate.proxy.router import Router
from nextstate.proxy.settings import ProxySettings
from nextstate.proxy.store import Store
from nextstate.proxy.transport import UpstreamClient, UpstreamTransport
from nextstate.proxy.types import ASGIApp, Receive, Scope, Send

# Endpoints that change the server; never reachable through the proxy.
ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
OPEN_PATHS = frozenset({"/health", "/openapi.json"})


class ApiKeyMiddleware:
    """Pure-ASGI check of ``Authorization: Bearer <key>`` when the proxy has keys; the
    key's tenant goes into the scope for the endpoints."""

    def __init__(self, app: ASGIApp, tenants_by_key: dict[bytes, str],
                 admin_key: str | None) -> None:
        self.app = app
        self.tenants_by_key = tenants_by_key
        self.admin_key = admin_key.encode() if admin_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guarded = self.tenants_by_key or self.admin_key
        if not guarded or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        token = given[7:] if given[:7].lower() == b"bearer " else b""
        if self.admin_key is not None and hmac.compare_digest(token, self.admin_key):
            scope[admin.ADMIN] = True
            await self.app(scope, receive, send)
            return
        tenant = None
        for key, name in self.tenants_by_key.items():
            if hmac.compare_digest(token, key):
                tenant = name
        if tenant is None:
            await send_error(send, Unauthorized("Missing or invalid API key for the proxy."))
            return
        scope[TENANT] = tenant
        await self.app(scope, receive, send)


class Passthrough:
    """Any other ``/v1/*`` request, forwarded as is and streamed back as is."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        deps: Deps = scope["state"]["deps"]
        if scope["path"].rstrip("/") in ADMIN_PATHS:
            await send_error(send, Forbidden(
                f"{scope['path']} changes the model server and is not reachable through "
                "the proxy."))
            return
        try:
            body = await read_body(receive, deps.settings.max_body_bytes,
                                   deps.settings.body_timeout_seconds)
        except ProxyError as exc:
            await send_error(send, exc)
            return
        query = scope.get("query_string", b"")
        url = scope["path"] + ("?" + query.decode("latin-1") if query else "")
        request = deps.client.build_request(
            scope["method"], url, content=body, headers=upstream_headers(scope["headers"], deps))
        response: httpx.Response | None = None
        done = False

        async def work() -> None:
            nonlocal response, done
            try:
                response = await deps.client.send(request, stream=True)
            except httpx.TransportError as exc:
                done = True
                await send_error(send, BackendUnavailable(
                    f"The model backend could not be reached ({type(exc).__name__})."))
                return
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": downstream_headers(response)})
            async for chunk in response.aiter_bytes():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            done = True
            await send({"type": "http.response.body", "body": b""})

        try:
            await until_disconnect(receive, work, lambda: done)
        finally:
            if response is not None:
                await response.aclose()


async def health(request: Request) -> Response:
    deps: Deps = request.state.deps
    key = deps.settings.backend_api_key

    async def check(url: str, client: httpx.AsyncClient) -> dict[str, object]:
        try:
            answer = await client.get("/health", timeout=2.0, headers={
                "authorization": f"Bearer {key}"} if key else None)
            return {"url": url, "ok": answer.status_code == 200}
        except httpx.HTTPError:
            return {"url": url, "ok": False}

    found = await asyncio.gather(*(check(b.url, b.client) for b in deps.backends.backends))
    up = any(b["ok"] for b in found)
    body = {
        "status": "ok" if all(b["ok"] for b in found) else "degraded" if up else "down",
        "backend": found[0], "backends": found,
        "recorder": deps.recorder.snapshot() if deps.settings.record else None,
    }
    return Response(orjson.dumps(body), status_code=200 if up else 503,
                    media_type="application/json")


async def openapi(request: Request) -> Response:
    return Response(orjson.dumps(openapi_schema()), media_type="application/json")


async def learner_status(request: Request) -> Response:
    """What the learner is doing (it writes its state to the store)."""
    deps: Deps = request.state.deps
    try:
        status = await asyncio.to_thread(deps.store.learner_status)
    except Exception as exc:
        raise StoreUnavailable(f"the store cannot be read ({type(exc).__name__})") from exc
    body = {"object": "nextstate.learner_status", "policy": deps.settings.policy,
            "serving": deps.router.current, "serving_personal": deps.router.personal,
            "learner": status}
    return Response(orjson.dumps(body), media_type="application/json")


def _error_response(exc: ProxyError) -> Response:
    return Response(exc.body(), status_code=exc.status, media_type="application/json")


async def _proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    return _error_response(exc)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return _error_response(NotFound(f"No route for {request.url.path}."))
    if exc.status_code == 405:
        return _error_response(InvalidRequest(
            f"Method {request.method} is not allowed on {request.url.path}."))
    return _error_response(InvalidRequest(str(exc.detail)))


def make_app(settings: ProxySettings, *, transport: httpx.AsyncBaseTransport | None = None,
             ) -> Starlette:
    """Build the proxy. ``transport`` replaces the network (tests use a MockTransport)."""

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

        backends = BackendPool(settings.backend_urls(), make_client)
        store = Store(settings.resolved_store_url(), busy_timeout=settings.sqlite_busy_timeout,
                      redactor=Redactor(settings.redact_patterns))
        recorder = Recorder(store, settings.resolved_spool_dir(),
                            queue_size=settings.queue_size,
                            idle_seconds=settings.session_idle_seconds,
                            pairing_wait=settings.pairing_wait_seconds,
                            retention_days=settings.retention_days,
                            sync_interval=settings.journal_sync_seconds)
        recorder.start()
        router = Router(settings.policy, settings.base_model)
        tasks = []
        if settings.policy:
            tasks.append(asyncio.create_task(router.follow(store,
                                                           settings.adapter_poll_seconds)))
        if settings.policy or len(backends.backends) > 1:
            tasks.append(asyncio.create_task(backends.watch(
                router, min(settings.health_interval_seconds,
                            settings.adapter_poll_seconds * 4))))
        try:
            yield {"deps": Deps(settings, backends, recorder, store, router)}
        finally:
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
            Route("/v1/feedback", post_feedback, methods=["POST"]),
            Route("/v1/next_state", post_next_state, methods=["POST"]),
            Route("/v1/learner/status", learner_status, methods=["GET"]),
            Route("/v1/export", admin.export, methods=["GET"]),
            Route("/v1/sessions/{session_id}", admin.delete_session, methods=["DELETE"]),
            Route("/v1/tenants/{tenant}", admin.delete_tenant, methods=["DELETE"]),
            Route("/v1/adapters", admin.list_adapters, methods=["GET"]),
            Route("/v1/adapters/rollback", admin.rollback, methods=["POST"]),
            Route("/v1/{path:path}", Passthrough(),
                  methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        ],
        exception_handlers={HTTPException: _http_exception, ProxyError: _proxy_error},
        lifespan=lifespan,
    )
    app.add_middleware(ApiKeyMiddleware, tenants_by_key=settings.tenants_by_key(),
                       admin_key=settings.admin_key)
    return app
