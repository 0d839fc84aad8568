"""Shared plumbing of the client-side adapters (agent -> proxy): where the proxy is, and
how feedback and late next states are sent to it."""

from __future__ import annotations

import os
from typing import Any

import httpx

TURN_ID_HEADER = "x-nextstate-turn-id"


def proxy_base_url(base_url: str | None = None) -> str:
    """The proxy's ``.../v1`` URL: given, else ``NEXTSTATE_BASE_URL``, else
    ``OPENAI_BASE_URL`` (which points at the proxy in a nextstate setup)."""
    url = base_url or os.environ.get("NEXTSTATE_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
    if not url:
        raise ValueError("where is the nextstate proxy? pass base_url or set OPENAI_BASE_URL")
    return url.rstrip("/")


def proxy_api_key(api_key: str | None = None) -> str | None:
    return api_key or os.environ.get("NEXTSTATE_API_KEY") or os.environ.get("OPENAI_API_KEY")


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def post(base_url: str, api_key: str | None, path: str, body: dict[str, Any],
         timeout: float = 10.0) -> dict[str, Any]:
    """POST to one of the proxy's own endpoints; raises httpx.HTTPStatusError on 4xx/5xx."""
    answer = httpx.post(f"{base_url}{path}", json=body, headers=auth_headers(api_key),
                        timeout=timeout)
    answer.raise_for_status()
    result: dict[str, Any] = answer.json()
    return result


def feedback_body(score: int, *, turn_id: str | None, session_id: str | None,
                  hint: str | None, comment: str | None, source: str) -> dict[str, Any]:
    body: dict[str, Any] = {"score": score, "source": source}
    if turn_id is not None:
        body["turn_id"] = turn_id
    else:
        body["session_id"] = session_id
    if hint:
        body["hint"] = hint
    if comment:
        body["comment"] = comment
    return body
