"""ASGI plumbing the proxy's endpoints share (agent -> proxy -> vLLM): reading a request
body within limits, the headers each side of the proxy gets, and watching for a client
that leaves. The relay (relay.py), the dialects (dialects/), the forwarded endpoints
(passthrough.py) and the proxy's own endpoints (feedback.py, admin.py) all use these, so
each rule (which headers never cross, what a body may be) is written once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson

from nextstate.proxy.deps import Deps
from nextstate.proxy.errors import InvalidRequest, PayloadTooLarge, RequestTimeout
from nextstate.proxy.types import Headers, Receive

TENANT = "nextstate.tenant"  # scope key set by the API-key middleware
# Hop-by-hop and framing headers are never copied between the two connections.
_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade", b"trailer",
        b"proxy-authorization", b"proxy-authenticate", b"host", b"content-length",
        b"accept-encoding", b"content-encoding", b"date", b"server"}
_OURS = (b"x-session-", b"x-turn-type", b"x-nextstate-")
_CREDENTIALS = frozenset({b"authorization", b"x-api-key"})


async def read_body(receive: Receive, limit: int, timeout: float = 30.0) -> bytes:
    """The whole request body, within a size limit and a time limit (slow clients)."""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):  # (anyio.fail_after costs ~10x as much)
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise InvalidRequest("client disconnected while sending the body")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body exceeds {limit} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError as exc:
        raise RequestTimeout(f"the request body did not arrive within {timeout:.0f}s") from exc


def parse_object(body: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise InvalidRequest("request body must be a JSON object")
    return obj


def ours(headers: Headers) -> dict[str, str]:
    """nextstate's own request headers (session, feedback, opt-out), decoded."""
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k.startswith(_OURS)}


def upstream_headers(headers: Headers, deps: Deps) -> list[tuple[bytes, bytes]]:
    """The client's headers minus hop-by-hop ones, ours, and credentials: vLLM gets the
    backend's key, or (a proxy with no keys of its own and none for vLLM) the client's."""
    out = [(k, v) for k, v in headers
           if k not in _HOP and not k.startswith(_OURS) and k not in _CREDENTIALS]
    settings = deps.settings
    if settings.backend_api_key:
        out.append((b"authorization", f"Bearer {settings.backend_api_key}".encode()))
    elif settings.api_key is None and not settings.client_keys and settings.admin_key is None:
        out.extend((k, v) for k, v in headers if k in _CREDENTIALS)
    return out


def downstream_headers(response: httpx.Response) -> list[tuple[bytes, bytes]]:
    return [(k.lower(), v) for k, v in response.headers.raw if k.lower() not in _HOP]


async def until_disconnect(receive: Receive, work: Callable[[], Awaitable[None]],
                           finished: Callable[[], bool]) -> bool:
    """Run ``work`` while watching for the client going away; True if it went away
    before ``finished()`` (cancelling ``work``)."""
    # Plain asyncio rather than an anyio task group: this runs on every request and a
    # task group costs ~50 µs; the watcher cancels this task, and only its own
    # cancellation is absorbed (uncancel) while any other propagates.
    task = asyncio.current_task()
    assert task is not None
    gone = cancelled = False

    async def watch() -> None:
        nonlocal gone, cancelled
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                gone = not finished()
                cancelled = True
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await work()
    except asyncio.CancelledError:
        if not cancelled or task.uncancel() > 0:
            raise
    else:
        if cancelled:  # work absorbed our cancellation itself
            task.uncancel()
    finally:
        watcher.cancel()
    return gone
