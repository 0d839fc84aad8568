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

import time
import uuid
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import httpx
import orjson

from nextstate.core.records import Endpoint, Recorded, TurnRecord
from nextstate.core.sessions import SessionMeta, owner, read_session_meta
from nextstate.proxy.asgi import (
    TENANT,
    downstream_headers,
    ours,
    parse_object,
    read_body,
    until_disconnect,
    upstream_headers,
)
from nextstate.proxy.capture import Asked, add_capture, is_usage_chunk, strip_response
from nextstate.proxy.deps import Deps
from nextstate.proxy.errors import (
    BackendUnavailable,
    InvalidRequest,
    ProxyError,
    Shape,
    map_upstream,
    send_error,
    unknown_model,
)
from nextstate.proxy.replicas import Backend
from nextstate.proxy.transport import UpstreamClient
from nextstate.proxy.types import Headers, Receive, Scope, Send

TURN_ID_HEADER = b"x-nextstate-turn-id"


class View(Protocol):
    """What a dialect (proxy/dialects/routes.py) makes of the chat exchange the relay
    carries: the client's bytes, in the dialect's shape, and what the record keeps."""

    endpoint: Recorded  # the record's endpoint
    shape: Shape  # the shape of the proxy's own errors

    def whole(self, status: int, raw: bytes) -> tuple[int, bytes]:
        """A whole chat answer (as the client would see it) -> the dialect's."""
        ...

    def events(self, data: bytes) -> bytes:
        """Complete chat SSE events (``data: ...\n\n``, as the client would see them)
        -> the dialect's events made so far."""
        ...

    def lost(self, error: ProxyError) -> bytes:
        """The dialect's in-band error event when the backend is lost mid-stream."""
        ...

    def kept(self) -> dict[str, Any] | None:
        """The record's ``dialect``: the request and the answer the client got."""
        ...


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
        turn = Turn(self.endpoint, self.url, deps, meta, body, headers, scope.get(TENANT))
        await turn.run(receive, send)


class Turn:
    """One request's relay state: the upstream response, the record, what the client asked."""

    def __init__(self, endpoint: Endpoint, url: Callable[[httpx.AsyncClient], httpx.URL],
                 deps: Deps, meta: SessionMeta, body: dict[str, Any], headers: Headers,
                 tenant: str | None, view: View | None = None) -> None:
        self.endpoint = endpoint
        self.view = view  # a dialect spoken over this chat exchange
        self.shape: Shape = view.shape if view is not None else "openai"
        self.url = url
        self.deps = deps
        self.started = time.time()
        self.recording = deps.settings.record and meta.record
        user = owner(meta.user, tenant)
        self.record: TurnRecord | None = None
        self.asked: Asked | None = None
        if self.recording:
            self.record = TurnRecord(
                turn_id=uuid.uuid4().hex, endpoint=view.endpoint if view else endpoint,
                created_at=self.started,
                request=dict(body), session_id=meta.session_id, turn_type=meta.turn_type,
                session_done=meta.done, tenant=tenant, user=user, feedback=meta.feedback)
            if deps.settings.capture:  # off: the backend gets the client's own fields
                self.asked = add_capture(
                    body, endpoint, deps.settings.sampler_logprobs == "recompute")
                self.record.logprobs_to_recompute = not self.asked.sampler_logprobs
        # The policy's name goes to its current adapter version (the user's own, if they
        # have one); the reply comes back under the name the client used.
        self.rename: str | None = None
        self.adapter: str | None = None  # the adapter a backend must have for this request
        asked_for = body.get("model")
        routed = deps.router.route(asked_for, user)
        if routed is not None and routed != asked_for:
            self.rename, body["model"] = body["model"], routed
            self.adapter = routed if routed != deps.router.base_model else None
        self.transform = self.record is not None or self.rename is not None
        # Which replica: the session's, else the conversation's opening (same prefix,
        # same replica, so vLLM's prefix cache is reused).
        self.affinity = ((meta.session_id or _opening(body))
                         if len(deps.backends.backends) > 1 else None)
        # Lessons that fit the request go into the prompt vLLM gets (memory.py); the
        # record keeps the client's request and says which lessons went where (and, for
        # a request an adapter serves, which arm of the hand-over it was in).
        if deps.memory is not None and meta.memory:
            lessons = deps.memory.serve(body, endpoint, asked_for, tenant, user,
                                        recorded=self.record is not None,
                                        adapter=self.adapter is not None)
            if lessons is not None and self.record is not None:
                self.record.lessons = lessons
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
                with map_upstream(f"The model backend at {self.deps.settings.backend_url} "
                                  "could not be reached", " Is vLLM running?"):
                    response = await self._send()
            except BackendUnavailable as exc:
                cause = exc.__cause__
                self._fail(502, f"backend unreachable: {type(cause).__name__}: {cause}")
                self._finish()
                await send_error(send, exc, self.shape)
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
        nothing was sent (replicas.py)."""
        backend, response = await self.deps.backends.send(
            self._post, affinity=self.affinity, adapter=self.adapter, router=self.deps.router)
        if response.status_code == 404 and self.rename is not None:
            # vLLM restarted between two checks and forgot the adapter: load, retry.
            await response.aclose()
            await self.deps.router.check_loaded(backend.vllm, self.adapter)
            response = await self._post(backend)
        return response

    async def _post(self, backend: Backend) -> httpx.Response:
        """The request to one backend; its reply streams."""
        client = backend.client
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
        status = response.status_code
        if self.view is not None:
            status, raw = self.view.whole(status, raw)
            self._keep_dialect(status)
        headers = self._headers_out(response)
        headers.append((b"content-length", str(len(raw)).encode()))
        self._finish()
        await send({"type": "http.response.start", "status": status,
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
            with map_upstream("The model backend closed the stream unexpectedly"):
                async for data in response.aiter_bytes():
                    *events, pending = (pending + data).split(b"\n\n")
                    out = b"".join(o for o in (self._event(e) for e in events) if o)
                    if self.view is not None and out:
                        out = self.view.events(out)
                        if self.done_seen:
                            self._keep_dialect(200)
                    if out:
                        if self.done_seen:
                            self._finish()
                        await send({"type": "http.response.body", "body": out,
                                    "more_body": True})
        except BackendUnavailable as error:
            # vLLM went away mid-stream: tell the client in-band, then end cleanly.
            if self.record is not None:
                cause = error.__cause__
                self.record.status = "aborted"
                self.record.error = f"backend lost mid-stream: {type(cause).__name__}: {cause}"
            lost = self.view.lost(error) if self.view is not None else (
                b"data: " + error.body() + b"\n\n")
            await send({"type": "http.response.body", "body": lost, "more_body": True})
        rest = self._release() + pending
        if self.view is not None:
            rest = self.view.events(rest) if rest.strip() else b""
            self._keep_dialect(200)
        self._finish()
        await send({"type": "http.response.body", "body": rest, "more_body": False})

    def _keep_dialect(self, status: int) -> None:
        """The dialect's request and answer into the record (before it is committed)."""
        if self.record is None or self.view is None:
            return
        self.record.dialect = self.view.kept()
        if status != 200 and self.record.http_status == 200:
            # The model answered but the dialect could not carry it (vLLM's own route
            # refuses the same answer): the client got an error.
            self.record.http_status = status
            self.record.error = self.record.error or "the answer does not fit the dialect"

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
