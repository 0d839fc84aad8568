"""What clients tell the proxy about earlier turns: feedback and late next states.

agent -> proxy -> store. ``POST /v1/feedback`` takes ``{turn_id | session_id, score,
hint?, comment?}`` (a thumbs button, a test verdict that arrives later);
``POST /v1/next_state`` takes ``{turn_id | session_id, messages, done?}`` (the tool
results of an agent that ended right after calling tools). Both are checked here (the
turn or session must exist and belong to the caller's tenant) and then travel through
the recorder like turns, so they are written in order and survive a store outage.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from nextstate.core.records import FeedbackRecord, NextStateRecord
from nextstate.core.sessions import parse_score
from nextstate.proxy.asgi import TENANT, parse_object, read_body
from nextstate.proxy.deps import Deps
from nextstate.proxy.errors import Conflict, InvalidRequest, NotFound, StoreUnavailable

MAX_TEXT = 8000
_SOURCE = re.compile(r"^adapter:[a-z0-9_.-]{1,40}$")


async def post_feedback(request: Request) -> Response:
    deps, body, tenant = await _read(request)
    turn_id, session_id = _target(body)
    try:
        score = parse_score(body.get("score"))
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="score") from exc
    record = FeedbackRecord(
        feedback_id=uuid.uuid4().hex, created_at=time.time(), score=score,
        source=_source(body), turn_id=turn_id, session_id=session_id,
        hint=_text(body, "hint"), comment=_text(body, "comment"), tenant=tenant)
    await _check_owner(deps, turn_id, session_id, tenant)
    deps.recorder.submit(record)
    return _json({"id": record.feedback_id, "object": "nextstate.feedback",
                  "turn_id": turn_id, "session_id": session_id, "score": score})


async def post_next_state(request: Request) -> Response:
    deps, body, tenant = await _read(request)
    turn_id, session_id = _target(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise InvalidRequest("messages must be a non-empty list of messages with a role",
                             param="messages")
    done = body.get("done", False)
    if not isinstance(done, bool):
        raise InvalidRequest("done must be a boolean", param="done")
    await _check_owner(deps, turn_id, session_id, tenant)
    record = NextStateRecord(
        record_id=uuid.uuid4().hex, created_at=time.time(), messages=messages,
        source=_source(body), turn_id=turn_id, session_id=session_id, done=done,
        tenant=tenant)
    deps.recorder.submit(record)
    return _json({"id": record.record_id, "object": "nextstate.next_state",
                  "turn_id": turn_id, "session_id": session_id})


async def _read(request: Request) -> tuple[Deps, dict[str, Any], str | None]:
    deps: Deps = request.state.deps
    body = parse_object(await read_body(request.receive, deps.settings.max_body_bytes,
                                        deps.settings.body_timeout_seconds))
    return deps, body, request.scope.get(TENANT)


def _target(body: dict[str, Any]) -> tuple[str | None, str | None]:
    turn_id, session_id = body.get("turn_id"), body.get("session_id")
    if (turn_id is None) == (session_id is None):
        raise InvalidRequest("give exactly one of turn_id and session_id")
    for name, value in (("turn_id", turn_id), ("session_id", session_id)):
        if value is not None and (not isinstance(value, str) or not value or len(value) > 128):
            raise InvalidRequest(f"{name} must be a non-empty string", param=name)
    return turn_id, session_id


def _text(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise InvalidRequest(f"{name} must be a string of at most {MAX_TEXT} characters",
                             param=name)
    return value or None


def _source(body: dict[str, Any]) -> str:
    source = body.get("source", "endpoint")
    if source != "endpoint" and not (isinstance(source, str) and _SOURCE.match(source)):
        raise InvalidRequest("source is 'endpoint' or 'adapter:<name>'", param="source")
    return str(source)


async def _check_owner(deps: Deps, turn_id: str | None, session_id: str | None,
                       tenant: str | None) -> None:
    """404 for an unknown turn or session, 409 for another tenant's."""
    known = deps.recorder.recent.owner(turn_id, session_id)
    if known is None:
        try:
            exists, owner = await asyncio.to_thread(deps.store.turns.owner, turn_id, session_id)
        except Exception as exc:
            raise StoreUnavailable(f"the store cannot be read right now ({type(exc).__name__})"
                                   ) from exc
        if not exists:
            what = f"turn {turn_id}" if turn_id else f"session {session_id}"
            raise NotFound(f"No recorded {what}.")
        known = (owner,)
    if deps.settings.client_keys and known[0] != tenant:
        raise Conflict("That turn or session belongs to another client.")


def _json(obj: dict[str, Any]) -> Response:
    return Response(orjson.dumps(obj), media_type="application/json")
