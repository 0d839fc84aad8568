"""The memory's controls over HTTP (client -> proxy -> store; ``nextstate memory`` is the
same over the store directly).

    GET    /v1/memory?user=&status=&tenant=   lessons, newest first (tenant=: admin only)
    POST   /v1/memory {text, user?, pinned?}   a lesson written by hand (pinned by default)
    PATCH  /v1/memory/{id} {text?, pinned?, status?}   edit, pin or unpin, retire or revive
    DELETE /v1/memory/{id}                     forget one lesson

With per-client keys a client sees and changes its own tenant's lessons only (its users'
and the tenant's own); another tenant's lesson is a 404, as if it did not exist. The
admin key (or a proxy without keys) sees every lesson, shared ones included, and may name
the tenant. A change reaches this proxy's index at once, other proxies at their next look
at the store.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from nextstate.core.sessions import MAX_USER_LENGTH, owner
from nextstate.core.store.lessons import STATUSES
from nextstate.proxy.admin import caller
from nextstate.proxy.asgi import parse_object, read_body
from nextstate.proxy.deps import Deps
from nextstate.proxy.errors import Forbidden, InvalidRequest, NotFound

MAX_TEXT = 2000


def routes() -> list[Route]:
    return [Route("/v1/memory", list_lessons, methods=["GET"]),
            Route("/v1/memory", add_lesson, methods=["POST"]),
            Route("/v1/memory/{lesson_id}", edit_lesson, methods=["PATCH"]),
            Route("/v1/memory/{lesson_id}", forget_lesson, methods=["DELETE"])]


def _string(body: dict[str, Any], name: str, limit: int) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise InvalidRequest(f"{name} must be a non-empty string of at most {limit} "
                             "characters", param=name)
    return value.strip()


def _flag(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be a boolean", param=name)
    return value


async def _body(request: Request, deps: Deps) -> dict[str, Any]:
    return parse_object(await read_body(request.receive, deps.settings.max_body_bytes,
                                        deps.settings.body_timeout_seconds))


async def _mine(request: Request) -> tuple[Deps, dict[str, Any]]:
    """The lesson named in the path, if the caller may see it (404 otherwise)."""
    deps, tenant, admin = caller(request)
    lesson_id = request.path_params["lesson_id"]
    row = await asyncio.to_thread(deps.store.lessons.get, lesson_id)
    if row is None or (not admin and row["tenant"] != tenant):
        raise NotFound(f"No lesson {lesson_id}.")
    return deps, row


async def _changed(deps: Deps) -> None:
    if deps.memory is not None:
        await deps.memory.refresh(force=True)


async def list_lessons(request: Request) -> Response:
    deps, tenant, admin = caller(request)
    params = request.query_params
    status = params.get("status")
    if status is not None and status not in STATUSES:
        raise InvalidRequest(f"status is one of {', '.join(STATUSES)}", param="status")
    if params.get("tenant") is not None and not admin:
        raise Forbidden("Naming a tenant needs the proxy's admin key.")
    user = params.get("user")
    if admin:
        named = params.get("tenant")
        rows = await asyncio.to_thread(
            deps.store.lessons.find, tenant=named, every_tenant=named is None, user=user,
            status=status)
    else:
        rows = await asyncio.to_thread(deps.store.lessons.find, tenant=tenant,
                                       user=owner(user, tenant) if user else None,
                                       status=status)
    return _json({"object": "list", "data": rows})


async def add_lesson(request: Request) -> Response:
    deps, tenant, admin = caller(request)
    body = await _body(request, deps)
    text = _string(body, "text", MAX_TEXT)
    if text is None:
        raise InvalidRequest("text is required", param="text")
    user = _string(body, "user", MAX_USER_LENGTH + 129)
    pinned = _flag(body, "pinned")
    if admin:
        tenant = _string(body, "tenant", 128)
    elif body.get("tenant") is not None:
        raise Forbidden("Naming a tenant needs the proxy's admin key.")
    else:
        user = owner(user, tenant) if user else None
    lesson_id = await asyncio.to_thread(deps.store.lessons.add, text, tenant=tenant,
                                        user=user, pinned=True if pinned is None else pinned)
    if lesson_id is None:
        raise InvalidRequest("text has nothing left once secrets are masked", param="text")
    await _changed(deps)
    return _json(await asyncio.to_thread(deps.store.lessons.get, lesson_id) or {})


async def edit_lesson(request: Request) -> Response:
    deps, row = await _mine(request)
    body = await _body(request, deps)
    status = body.get("status")
    if status is not None and status not in STATUSES:
        raise InvalidRequest(f"status is one of {', '.join(STATUSES)}", param="status")
    try:
        edited = await asyncio.to_thread(
            deps.store.lessons.edit, row["id"], text=_string(body, "text", MAX_TEXT),
            pinned=_flag(body, "pinned"), status=status)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="text") from exc
    if edited is None:
        raise NotFound(f"No lesson {row['id']}.")
    await _changed(deps)
    return _json(edited)


async def forget_lesson(request: Request) -> Response:
    deps, row = await _mine(request)
    await asyncio.to_thread(deps.store.lessons.forget, row["id"])
    await _changed(deps)
    return _json({"object": "nextstate.deleted", "lesson": row["id"]})


def _json(obj: Any) -> Response:
    return Response(orjson.dumps(obj), media_type="application/json")
