"""The proxy's own data and administration endpoints (client -> proxy -> store, vLLM).

    GET    /v1/export?session_id=          the caller's turns as JSON lines (admin: all);
           &with_images=true               images inline as sent, not the store's
                                           nextstate-image: references
    DELETE /v1/sessions/{session_id}       forget a session and what was derived from it
    DELETE /v1/tenants/{tenant}            forget everything of a tenant, its users'
                                           personal adapters included (admin)
    GET    /v1/adapters                    the learner's adapter versions (admin)
    POST   /v1/adapters/rollback {version} serve an earlier version again (admin)

With per-client keys, a client sees and deletes only its own tenant's data; the admin
key (``--admin-key``) sees everything. A proxy with no keys at all is open (it binds
loopback by default).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from nextstate.core import lora
from nextstate.core.lora import AdapterStatus
from nextstate.proxy.asgi import TENANT, parse_object, read_body
from nextstate.proxy.deps import Deps
from nextstate.proxy.errors import BackendUnavailable, Forbidden, InvalidRequest, NotFound

ADMIN = "nextstate.admin"  # scope key set by the API-key middleware


def caller(request: Request) -> tuple[Deps, str | None, bool]:
    """(deps, the caller's tenant, whether it may see every tenant: the admin key, or a
    proxy without client keys)."""
    deps: Deps = request.state.deps
    admin = bool(request.scope.get(ADMIN)) or not deps.settings.tenants_by_key()
    return deps, request.scope.get(TENANT), admin


def require_admin(request: Request) -> Deps:
    deps, _, admin = caller(request)
    if not admin:
        raise Forbidden("This needs the proxy's admin key.")
    return deps


async def export(request: Request) -> Response:
    deps, tenant, admin = caller(request)
    session_id = request.query_params.get("session_id")
    with_images = request.query_params.get("with_images", "").lower() in ("1", "true", "yes")
    turns = await asyncio.to_thread(
        lambda: list(deps.store.turns.iterate(session_id=session_id,
                                              tenant=None if admin else tenant,
                                              with_images=with_images)))

    async def lines() -> AsyncIterator[bytes]:
        for turn in turns:
            yield orjson.dumps(turn) + b"\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


async def delete_session(request: Request) -> Response:
    deps, tenant, admin = caller(request)
    session_id = request.path_params["session_id"]
    deleted = await asyncio.to_thread(deps.store.retention.forget, session_id=session_id,
                                      tenant=None if admin else tenant)
    if not deleted.turns:
        raise NotFound(f"No session {session_id}.")  # also for another tenant's
    return _json({"object": "nextstate.deleted", "session_id": session_id,
                  "turns": deleted.turns})


async def delete_tenant(request: Request) -> Response:
    """The tenant's turns go, and its users' personal adapters stop being served: this
    proxy stops routing to them at once (others at their next look at the store), their
    directories are deleted and each backend is told to unload them (a backend that
    cannot be reached now is left to the learner)."""
    deps = require_admin(request)
    tenant = request.path_params["tenant"]
    deleted, _ = await lora.forget(deps.store, [b.vllm for b in deps.backends.backends],
                                   router=deps.router, tenant=tenant)
    return _json({"object": "nextstate.deleted", "tenant": tenant, "turns": deleted.turns,
                  "adapters": [row["name"] for row in deleted.adapters]})


async def list_adapters(request: Request) -> Response:
    deps = require_admin(request)
    rows = await asyncio.to_thread(deps.store.adapters.versions)
    return _json({"object": "list", "data": rows})


async def rollback(request: Request) -> Response:
    deps = require_admin(request)
    # A web page can post text or a form to any address without asking; JSON it can't
    # (the browser asks first, and the proxy grants no other origin): so no page a
    # person visits can roll back a proxy that has no keys.
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise InvalidRequest("send the body as JSON, with Content-Type: application/json")
    body = parse_object(await read_body(request.receive, deps.settings.max_body_bytes,
                                        deps.settings.body_timeout_seconds))
    version = body.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise InvalidRequest("version must be an integer", param="version")
    try:
        row = await lora.rollback(deps.store, [b.vllm for b in deps.backends.backends],
                                  version)
    except lora.NoSuchVersion as exc:
        raise NotFound(f"No published adapter version {version}.") from exc
    except lora.DirectoryGone as exc:
        raise NotFound(f"Adapter version {version} cannot serve again: {exc}.") from exc
    except lora.NotLoaded as exc:
        raise BackendUnavailable(str(exc)) from exc
    return _json({"object": "nextstate.adapter", "name": row["name"],
                  "status": AdapterStatus.CURRENT})


def _json(obj: dict[str, Any]) -> Response:
    return Response(orjson.dumps(obj), media_type="application/json")
