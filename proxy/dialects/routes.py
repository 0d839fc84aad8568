"""The dialect routes: ``/v1/messages`` and ``/v1/responses``, recorded like chat
(agent ─(Messages | Responses)─> **routes** ─> relay ─(chat)─> vLLM).

Each request is read as chat's is (body limits, session headers and body fields,
feedback headers, the opt-out, the policy's name), translated to the chat request vLLM
itself would build (`anthropic.to_chat`, `responses.to_chat` after
`conversation.expand`), then handed to the chat relay with a view (views.py): the
relay does for it everything it does for chat (capture of exact token ids and sampled
logprobs, the adapter mapping, replicas and failover, ``X-NextState-Turn-Id``, the
record, committed before the client gets the end of its answer), and the view turns
the answer back into the dialect. So a dialect turn is recorded as the chat exchange the
model saw (``request``, ``response``, token ids), its dialect in ``endpoint``, the
client's own request and answer in ``dialect``; sessions, next states, judges and the
learner read it as a chat turn.

Also here: ``GET`` and ``DELETE /v1/responses/{id}`` from the kept responses (kept.py).
Errors take each API's own shape; bad input is a 400, never a 500.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.routing import Route

from nextstate.core.sessions import read_session_meta
from nextstate.proxy.asgi import TENANT, ours, parse_object, read_body
from nextstate.proxy.deps import Deps
from nextstate.proxy.dialects import JSON, anthropic, responses
from nextstate.proxy.dialects.conversation import expand
from nextstate.proxy.dialects.kept import KeptResponses
from nextstate.proxy.dialects.views import MessagesView, ResponsesView
from nextstate.proxy.errors import (
    InvalidRequest,
    NotFound,
    ProxyError,
    Shape,
    send_error,
    unknown_model,
)
from nextstate.proxy.relay import Generation, Turn, View
from nextstate.proxy.types import Receive, Scope, Send


class _Dialect:
    """What both dialect endpoints do around their translation."""

    shape: Shape = "openai"

    def __init__(self, kept: KeptResponses) -> None:
        self.kept = kept
        self.chat = Generation("chat", "/v1/chat/completions")  # its URL cache

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        deps: Deps = scope["state"]["deps"]
        headers = scope["headers"]
        tenant = scope.get(TENANT)
        try:
            body = parse_object(await read_body(receive, deps.settings.max_body_bytes,
                                                deps.settings.body_timeout_seconds))
            try:
                meta = read_session_meta(ours(headers), body)
            except ValueError as exc:
                raise InvalidRequest(str(exc)) from exc
            if deps.router.private(body.get("model")):
                raise unknown_model(str(body["model"]))
            try:
                chat, view = await self.translate(deps, body, tenant)
            except (KeyError, TypeError, AttributeError, ValueError) as exc:
                # A shape the translators' checks did not foresee: still the client's.
                raise InvalidRequest(f"malformed request: {type(exc).__name__}: {exc}"
                                     ) from exc
        except ProxyError as exc:
            await send_error(send, exc, self.shape)
            return
        turn = Turn("chat", self.chat.url, deps, meta, chat, headers, tenant, view)
        await turn.run(receive, send)

    async def translate(self, deps: Deps, body: JSON, tenant: str | None,
                        ) -> tuple[JSON, View]:
        """The chat request vLLM would build for this dialect body, and the view that
        turns the answer back; each dialect (`Messages`, `Responses`) defines it."""
        raise NotImplementedError


class Messages(_Dialect):
    """``POST /v1/messages``."""

    shape: Shape = "anthropic"

    async def translate(self, deps: Deps, body: JSON, tenant: str | None,
                        ) -> tuple[JSON, View]:
        return anthropic.to_chat(body), MessagesView(body)


class Responses(_Dialect):
    """``POST /v1/responses``."""

    def __init__(self, kept: KeptResponses) -> None:
        super().__init__(kept)
        self.served: responses.Served | None = None

    async def translate(self, deps: Deps, body: JSON, tenant: str | None,
                        ) -> tuple[JSON, View]:
        previous = body.get("previous_response_id")
        found = await self.kept.get(deps.store, tenant, previous) \
            if isinstance(previous, str) and previous else None
        expanded = expand(body, lambda _: found)
        chat = responses.to_chat(expanded)
        return chat, ResponsesView(expanded, await self._served(deps), self.kept, tenant)

    async def _served(self, deps: Deps) -> responses.Served:
        """The server's facts the echo needs (its context length), asked once."""
        if self.served is None:
            length = await _max_model_len(deps)
            served = responses.Served(max_model_len=length)
            if length is None:
                return served  # ask again next time
            self.served = served
        return self.served


async def _max_model_len(deps: Deps) -> int | None:
    for backend in deps.backends.ranked(None):
        try:  # the proxy's own call: with the backend's key
            length = await backend.vllm.max_model_len()
        except Exception:  # noqa: BLE001 (any failure: the echo goes without it)
            continue
        if length is not None:
            return length
    return None


class KeptResponse:
    """``GET`` (the Responses object as served) and ``DELETE /v1/responses/{id}``."""

    def __init__(self, kept: KeptResponses) -> None:
        self.kept = kept

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        deps: Deps = scope["state"]["deps"]
        response_id = str((scope.get("path_params") or {}).get("response_id", ""))
        tenant = scope.get(TENANT)
        missing = NotFound(f"Response with id '{response_id}' not found.",
                           param="response_id")
        body: Any
        try:
            if scope["method"] == "DELETE":
                if not await self.kept.delete(deps.store, tenant, response_id):
                    raise missing
                body = {"id": response_id, "object": "response", "deleted": True}
            else:
                found = await self.kept.get(deps.store, tenant, response_id)
                if found is None:
                    raise missing
                body = found.response
        except ProxyError as exc:
            await send_error(send, exc)
            return
        raw = orjson.dumps(body)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]})
        await send({"type": "http.response.body", "body": raw})


def routes(size: int = 1024) -> list[Route]:
    """The recorded dialect routes, sharing one set of kept responses."""
    kept = KeptResponses(size)
    return [
        Route("/v1/messages", Messages(kept), methods=["POST"]),
        Route("/v1/responses", Responses(kept), methods=["POST"]),
        Route("/v1/responses/{response_id}", KeptResponse(kept), methods=["GET", "DELETE"]),
    ]
