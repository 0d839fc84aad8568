"""The request path: relay chat/completions to vLLM and record the turn on the side.

agent -> proxy -> vLLM. Each request gets a small responder object holding its own
state. It goes to the session's vLLM replica (failing over while nothing was sent), with
the policy's name mapped to its current adapter. Bytes are forwarded as they arrive; the
record is filled in alongside and handed to the recorder (proxy -> journal -> store)
before the client gets the end of its answer: before a whole reply's body, before the
stream event that carries ``[DONE]`` (or the stream's last bytes), before an error
reply; a turn that ends otherwise is handed over in ``finally``. So every answer a
client got is on disk, whatever happens to the process next. A client that disconnects
cancels the upstream request (closing the connection makes vLLM abort it) and its
partial turn is kept, marked ``aborted``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson

from nextstate.core.records import Endpoint, TurnRecord
from nextstate.core.sessions import SessionMeta, owner, read_session_meta
from nextstate.core.vllm import VLLMUnreachable
from nextstate.proxy.capture import Asked, add_capture, is_usage_chunk, strip_response
from nextstate.proxy.deps import Deps
from nextstate.proxy.errors import (
    BackendUnavailable,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    Shape,
)
from nextstate.proxy.transport import NOTHING_SENT, UpstreamClient
from nextstate.proxy.types import Headers, Receive, Scope, Send

TURN_ID_HEADER = b"x-nextstate-turn-id"
TENANT = "nextstate.tenant"  # scope key set by the API-key middleware
# Hop-by-hop and framing headers are never copied between the two connections.
_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade", b"trailer",
        b"proxy-authorization", b"proxy-authenticate", b"host", b"content-length",
        b"accept-encoding", b"content-encoding", b"date", b"server"}
_OURS = (b"x-session-", b"x-turn-type", b"x-nextstate-")
_CREDENTIALS = frozenset({b"authorization", b"x-api-key"})
# A request may go to another replica after these: it was not sent (or the replica could
# not even be asked whether it has the request's adapter).
_FAIL_OVER: tuple[type[Exception], ...] = (*NOTHING_SENT, VLLMUnreachable)


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


def unknown_model(model: str) -> NotFound:
    """What a client that names an adapter version itself is told (vLLM's own words for a
    model it does not serve): versions are reached through the policy's name only."""
    return NotFound(f"The model `{model}` does not exist.", param="model")


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


async def send_error(send: Send, exc: ProxyError, shape: Shape = "openai") -> None:
    body = exc.body(shape)
    await send({"type": "http.response.start", "status": exc.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


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


class Generation:
    """ASGI endpoint for ``/v1/chat/completions`` and ``/v1/completions``."""

    def __init__(self, endpoint: Endpoint, path: str) -> None:
        self.endpoint = endpoint
        self.path = path
        self._urls: weakref.WeakKeyDictionary[httpx.AsyncClient, httpx.URL] = (
            weakref.WeakKeyDictionary())

    def url(self, client: httpx.AsyncClient) -> httpx.URL:
        """This endpoint's absolute URL on a backend, merged with its base URL once (httpx
        parses a relative URL again on every request: ~40 µs)."""
        url = self._urls.get(client)
        if url is None:
            url = self._urls[client] = client.build_request("POST", self.path).url
        return url

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        deps: Deps = scope["state"]["deps"]
        try:
            body = parse_object(await read_body(receive, deps.settings.max_body_bytes,
                                                deps.settings.body_timeout_seconds))
        except ProxyError as exc:
            await send_error(send, exc)
            return
        headers: Headers = scope["headers"]
        try:
            meta = read_session_meta(ours(headers), body)
        except ValueError as exc:
            await send_error(send, InvalidRequest(str(exc)))
            return
        if deps.router.private(body.get("model")):
            await send_error(send, unknown_model(body["model"]))
            return
        turn = _Turn(self.endpoint, self.url, deps, meta, body, headers, scope.get(TENANT))
        await turn.run(receive, send)


class _Turn:
    """One request's relay state: the upstream response, the record, what the client asked."""

    def __init__(self, endpoint: Endpoint, url: Callable[[httpx.AsyncClient], httpx.URL],
                 deps: Deps, meta: SessionMeta, body: dict[str, Any], headers: Headers,
                 tenant: str | None) -> None:
        self.endpoint = endpoint
        self.url = url
        self.deps = deps
        self.started = time.time()
        self.recording = deps.settings.record and meta.record
        user = owner(meta.user, tenant)
        self.record: TurnRecord | None = None
        self.asked: Asked | None = None
        if self.recording:
            self.record = TurnRecord(
                turn_id=uuid.uuid4().hex, endpoint=endpoint, created_at=self.started,
                request=dict(body), session_id=meta.session_id, turn_type=meta.turn_type,
                session_done=meta.done, tenant=tenant, user=user, feedback=meta.feedback)
            self.asked = add_capture(body, endpoint)
        # The policy's name goes to its current adapter version (the user's own, if they
        # have one); the reply comes back under the name the client used.
        self.rename: str | None = None
        self.adapter: str | None = None  # the adapter a backend must have for this request
        routed = deps.router.route(body.get("model"), user)
        if routed is not None and routed != body.get("model"):
            self.rename, body["model"] = body["model"], routed
            self.adapter = routed if routed != deps.router.base_model else None
        self.transform = self.record is not None or self.rename is not None
        # Which replica: the session's, else the conversation's opening (same prefix,
        # same replica, so vLLM's prefix cache is reused).
        self.affinity = ((meta.session_id or _opening(body))
                         if len(deps.backends.backends) > 1 else None)
        self.stream = bool(body.get("stream"))
        self.payload = orjson.dumps(body)
        self.headers = upstream_headers(headers, deps)
        self.finished = False  # the client is getting the end of its answer
        self.done_seen = False  # the stream's [DONE] is among the events to send
        self.held: list[dict[str, Any]] = []  # stream chunks waiting for the usage chunk

    async def run(self, receive: Receive, send: Send) -> None:
        response: httpx.Response | None = None

        async def work() -> None:
            nonlocal response
            try:
                response = await self._send()
            except (httpx.TransportError, VLLMUnreachable) as exc:
                self._fail(502, f"backend unreachable: {type(exc).__name__}: {exc}")
                self._finish()
                await send_error(send, BackendUnavailable(
                    f"The model backend at {self.deps.settings.backend_url} could not be "
                    f"reached ({type(exc).__name__}). Is vLLM running?"))
                return
            ok = response.status_code == 200
            if self.stream and ok and "text/event-stream" in response.headers.get(
                    "content-type", ""):
                await self._relay_stream(response, send)
            else:
                await self._relay_whole(response, send)

        try:
            gone = await until_disconnect(receive, work, lambda: self.finished)
            if gone and self.record is not None:
                self.record.status = "aborted"
                self.record.error = self.record.error or "client disconnected"
        finally:
            if response is not None:
                await response.aclose()
            self._commit()

    def _finish(self) -> None:
        """The client is about to get the end of its answer: record the turn first."""
        self.finished = True
        self._commit()

    def _commit(self) -> None:
        """Hand the record to the recorder (into the journal at once), once."""
        record, self.record = self.record, None
        if record is not None:
            record.finished_at = time.time()
            self.deps.recorder.submit(record)

    async def _send(self) -> httpx.Response:
        """Send upstream: to this session's replica, failing over to the next while
        nothing was sent (the connection was refused or timed out, or the replica
        could not be asked for the adapter the request needs)."""
        pool = self.deps.backends
        adapter = self.adapter
        shared = self.deps.router.current if adapter is not None else None
        candidates = (pool.ranked(self.affinity, shared) if len(pool.backends) > 1
                      else pool.backends)
        for i, backend in enumerate(candidates):
            client = backend.client
            try:
                if adapter is not None and not backend.has(adapter):
                    # Not known to have it (a restart, a new version): check, load if
                    # missing, before the policy request goes there.
                    await pool.ensure_adapter(backend, self.deps.router, adapter)
                response = await self._post(client)
            except _FAIL_OVER:
                pool.mark_down(backend)
                if i == len(candidates) - 1:
                    raise
                continue
            if response.status_code == 404 and self.rename is not None:
                # vLLM restarted between two checks and forgot the adapter: load, retry.
                await response.aclose()
                await self.deps.router.check_loaded(backend.vllm, adapter)
                response = await self._post(client)
            return response
        raise AssertionError("unreachable: the pool always has a backend")

    async def _post(self, client: httpx.AsyncClient) -> httpx.Response:
        """The request to one backend; its reply streams."""
        url = self.url(client)
        if isinstance(client, UpstreamClient):  # the direct path (proxy/transport.py)
            return await client.send_direct(client.direct_request(
                "POST", url, self.payload, self.headers))
        return await client.send(client.build_request(
            "POST", url, content=self.payload, headers=self.headers), stream=True)

    def _fail(self, status: int, error: str) -> None:
        if self.record is not None:
            self.record.status = "upstream_error"
            self.record.http_status = status
            self.record.error = error

    def _headers_out(self, response: httpx.Response) -> list[tuple[bytes, bytes]]:
        out = downstream_headers(response)
        if self.record is not None:
            out.append((TURN_ID_HEADER, self.record.turn_id.encode()))
        return out

    async def _relay_whole(self, response: httpx.Response, send: Send) -> None:
        raw = await response.aread()
        if self.record is not None:
            self.record.http_status = response.status_code
            if response.status_code != 200:
                self._fail(response.status_code, raw[:4000].decode("utf-8", "replace"))
        if response.status_code == 200 and self.transform:
            raw = self._capture_whole(raw)
        headers = self._headers_out(response)
        headers.append((b"content-length", str(len(raw)).encode()))
        self._finish()
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": headers})
        await send({"type": "http.response.body", "body": raw})

    def _capture_whole(self, raw: bytes) -> bytes:
        obj = _json_object(raw)
        if obj is None:
            if self.record is not None:
                self.record.error = "backend answered 200 with a body that is not a JSON object"
            return raw
        if self.record is not None:
            self.record.response = obj
        view = self._client_view(obj)
        return raw if view is None else orjson.dumps(view)

    def _client_view(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """What the client gets for a reply (or chunk): None when it is unchanged."""
        out = None
        if self.asked is not None and not self.asked.everything:
            out = strip_response(obj, self.asked, self.endpoint)
        if self.rename is not None and "model" in obj:
            out = dict(out if out is not None else obj)
            out["model"] = self.rename
        return out

    async def _relay_stream(self, response: httpx.Response, send: Send) -> None:
        if self.record is not None:
            self.record.http_status = response.status_code
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": self._headers_out(response)})
        pending = b""
        try:
            async for data in response.aiter_bytes():
                *events, pending = (pending + data).split(b"\n\n")
                out = [o for o in (self._event(e) for e in events) if o]
                if out:
                    if self.done_seen:
                        self._finish()
                    await send({"type": "http.response.body", "body": b"".join(out),
                                "more_body": True})
        except httpx.TransportError as exc:
            # vLLM went away mid-stream: tell the client in-band, then end cleanly.
            if self.record is not None:
                self.record.status = "aborted"
                self.record.error = f"backend lost mid-stream: {type(exc).__name__}: {exc}"
            error = BackendUnavailable("The model backend closed the stream unexpectedly.")
            await send({"type": "http.response.body",
                        "body": b"data: " + error.body() + b"\n\n", "more_body": True})
        self._finish()
        await send({"type": "http.response.body", "body": self._release() + pending,
                    "more_body": False})

    def _event(self, event: bytes) -> bytes | None:
        """One SSE event in, the bytes the client gets out (None: nothing yet)."""
        if not self.transform or not event.startswith(b"data:"):
            return event + b"\n\n"
        payload = event[5:].strip()
        if payload == b"[DONE]":
            self.done_seen = True
            return self._release() + event + b"\n\n"
        chunk = _json_object(payload)
        if chunk is None:
            return self._release() + event + b"\n\n"
        if self.record is not None:
            self.record.chunks.append(chunk)
            if self.record.ttft_ms is None and any(
                    isinstance(c, dict) and c.get("token_ids") for c in chunk.get("choices") or []):
                self.record.ttft_ms = round((time.time() - self.started) * 1000, 3)
        view = self._client_view(chunk)
        if self.asked is not None and not self.asked.usage_chunk:
            # With include_usage vLLM moves `system_fingerprint` from each finish chunk
            # to the usage chunk. Hold finish chunks (and what follows, to keep order)
            # until the usage chunk arrives, then give the field back and drop it.
            if is_usage_chunk(chunk):
                return self._release(chunk.get("system_fingerprint"))
            if self.held or _finishes(chunk):
                self.held.append(view if view is not None else dict(chunk))
                return None
        return event + b"\n\n" if view is None else _sse(view)

    def _release(self, fingerprint: Any = None) -> bytes:
        out = []
        for chunk in self.held:
            if fingerprint is not None and _finishes(chunk):
                chunk.setdefault("system_fingerprint", fingerprint)
            out.append(_sse(chunk))
        self.held.clear()
        return b"".join(out)


def _opening(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list):
        return repr(messages[:2])
    return repr(body.get("prompt", ""))[:2000]


def _json_object(payload: bytes) -> dict[str, Any] | None:
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _finishes(chunk: dict[str, Any]) -> bool:
    return any(isinstance(c, dict) and c.get("finish_reason")
               for c in chunk.get("choices") or [])


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"
