"""The dashboard's sessions and turns (browser -> proxy -> store, vLLM).

    GET /v1/dashboard/sessions?q=&offset=&limit=   the list, searchable, newest first
    GET /v1/dashboard/sessions/{session_id}        one session, turn by turn: what was
                                                   asked, the reply, its next state, its
                                                   judgment (votes, hints), feedback, the
                                                   adapter that served it, latency, tokens
    GET /v1/dashboard/turns/{turn_id}/tokens       one turn's completion tokens: text,
                                                   the sampler's logprob, the teacher's
                                                   under each hint where distillation
                                                   scored them
    GET /v1/dashboard/images/{sha256}              an image a turn references (a GUI
                                                   agent's screenshot), its bytes as sent

A tenant's key finds only its own sessions and turns, and the images they reference;
another tenant's are a 404, as if they did not exist. A session's page leaves the token
ids out (a long session carries thousands); the tokens of one turn are asked for on
their own, and their text comes from vLLM's ``/detokenize`` (the store keeps ids, never
text re-tokenized). Images come as the references the store keeps in their place; the
page asks for each one's bytes.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from nextstate.core.vllm import VLLMError
from nextstate.proxy.dashboard.viewer import in_store, json_response, viewer
from nextstate.proxy.deps import Deps
from nextstate.proxy.errors import InvalidRequest, NotFound

PAGE = 50
MAX_PAGE = 200
MAX_QUERY = 200
MAX_TOKENS = 512  # shown per turn (the rest are counted)
DETOKENIZE_AT_ONCE = 16
SHA256 = re.compile(r"[0-9a-f]{64}")  # an image's name in the store


def _int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer", param=name) from None
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}", param=name)
    return value


async def list_sessions(request: Request) -> Response:
    deps, who = viewer(request)
    query = request.query_params.get("q", "").strip()
    if len(query) > MAX_QUERY:
        raise InvalidRequest(f"q must be at most {MAX_QUERY} characters", param="q")
    limit = _int(request, "limit", PAGE, 1, MAX_PAGE)
    offset = _int(request, "offset", 0, 0, 10**9)
    found = await in_store(deps.store.browse.sessions, tenant=who.scope, query=query,
                           limit=limit, offset=offset)
    return json_response({"object": "list", "query": query, "offset": offset,
                          "limit": limit, **found})


def _page_turn(turn: dict[str, Any]) -> dict[str, Any]:
    """A turn as the session page shows it: token arrays become counts."""
    out = {k: v for k, v in turn.items()
           if k not in ("prompt_token_ids", "completion_token_ids", "logprobs")}
    out["prompt_tokens"] = len(turn.get("prompt_token_ids") or [])
    out["completion_tokens"] = len(turn.get("completion_token_ids") or [])
    return out


async def get_session(request: Request) -> Response:
    deps, who = viewer(request)
    session_id = request.path_params["session_id"]
    turns = await in_store(deps.store.browse.session, session_id, tenant=who.scope)
    if turns is None:
        raise NotFound(f"No session {session_id}.")  # also for another tenant's
    return json_response({"object": "nextstate.session", "session_id": session_id,
                          "turns": [_page_turn(t) for t in turns]})


async def _pieces(deps: Deps, model: str | None, ids: list[int]) -> list[str] | None:
    """Each token's text, from the first backend that answers; None when none does."""
    if not ids or model is None:
        return None
    vllm = deps.backends.first.vllm
    gate = asyncio.Semaphore(DETOKENIZE_AT_ONCE)

    async def piece(token: int) -> str:
        async with gate:
            return await vllm.detokenize(model, [token])

    try:
        return list(await asyncio.gather(*(piece(t) for t in ids)))
    except VLLMError:
        return None


async def turn_tokens(request: Request) -> Response:
    deps, who = viewer(request)
    turn_id = request.path_params["turn_id"]
    found = await in_store(deps.store.browse.tokens, turn_id, tenant=who.scope)
    if found is None:
        raise NotFound(f"No turn {turn_id}.")
    ids = [int(t) for t in found["token_ids"]][:MAX_TOKENS]
    # The base model's tokenizer is every adapter's: ask by the name vLLM serves it under.
    model = deps.router.base_model or found["model"]
    pieces = await _pieces(deps, model, ids)
    teachers = found["teacher_logprobs"]
    tokens = [{"id": token,
               "text": pieces[i] if pieces is not None else None,
               "logprob": found["logprobs"][i] if i < len(found["logprobs"]) else None,
               "teacher": [t[i] if i < len(t) else None for t in teachers]}
              for i, token in enumerate(ids)]
    return json_response({"object": "nextstate.tokens", "turn_id": turn_id,
                          "served_model": found["served_model"], "hints": found["hints"],
                          "total": len(found["token_ids"]), "tokens": tokens,
                          "untrainable": found["untrainable"]})


async def image(request: Request) -> Response:
    deps, who = viewer(request)
    digest = request.path_params["sha256"]
    found = await in_store(deps.store.turns.images.image, digest, tenant=who.scope) \
        if SHA256.fullmatch(digest) else None
    if found is None:
        raise NotFound(f"No image {digest[:64]}.")
    media_type, data = found
    # Bytes a client sent: never run as a page of this origin (an SVG can hold script);
    # the dashboard shows them in an <img>. The hash names the content: it never changes.
    return Response(data, media_type=media_type, headers={
        "Cache-Control": "private, max-age=86400, immutable",
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; sandbox",
        "X-Content-Type-Options": "nosniff"})
