"""The inference endpoints the proxy forwards without recording (agent -> proxy -> vLLM).

The proxy is an allowlist. Chat and completions are relayed and recorded
(proxy/relay.py), and so are Anthropic's Messages and OpenAI's Responses, spoken over
chat (proxy/dialects/routes.py, which also answers ``GET``/``DELETE
/v1/responses/{id}``); the endpoints below are forwarded as they are; everything else
is answered by the proxy itself (its own endpoints, or a 404) and never reaches vLLM:

    POST /v1/responses/{response_id}/cancel
    POST /v1/messages/count_tokens        Anthropic's token count (errors in its shape)
    GET  /v1/models                       the served models
    POST /v1/embeddings                   embedding models
    POST /tokenize, POST /detokenize      vLLM's tokenizer, as clients count tokens with it

Each is a `Forward`: the body (within the proxy's size and time limits) and the query go
to the route's own path, never the client's spelling of it, on the first backend that
can be reached (failing over while nothing was sent), with the backend's key instead of
the client's; vLLM's answer streams back untouched.
"""

from __future__ import annotations

import urllib.parse

import httpx
import orjson
from starlette.routing import Route

from nextstate.proxy.asgi import (
    downstream_headers,
    read_body,
    until_disconnect,
    upstream_headers,
)
from nextstate.proxy.deps import Deps
from nextstate.proxy.errors import (
    BackendUnavailable,
    ProxyError,
    map_upstream,
    send_error,
    shape_for,
    unknown_model,
)
from nextstate.proxy.replicas import Backend
from nextstate.proxy.types import Receive, Scope, Send


class Forward:
    """An ASGI endpoint that sends the request to ``path`` on vLLM (``{name}`` parts
    filled in from the route's path parameters) and streams the answer back."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.shape = shape_for(path)

    def target(self, scope: Scope) -> str:
        params = scope.get("path_params") or {}
        return self.path.format(**{k: urllib.parse.quote(str(v), safe="")
                                   for k, v in params.items()})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        deps: Deps = scope["state"]["deps"]
        try:
            body = await read_body(receive, deps.settings.max_body_bytes,
                                   deps.settings.body_timeout_seconds)
        except ProxyError as exc:
            await send_error(send, exc, self.shape)
            return
        model = _model(body)
        if deps.router.private(model):
            await send_error(send, unknown_model(str(model)), self.shape)
            return
        response: httpx.Response | None = None
        done = False

        async def work() -> None:
            nonlocal response, done
            try:
                with map_upstream():
                    response = await self._send(deps, scope, body)
            except BackendUnavailable as exc:
                done = True
                await send_error(send, exc, self.shape)
                return
            if self.path == "/v1/models" and response.status_code == 200:
                await self._models(deps, response, send)
                done = True
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

    async def _models(self, deps: Deps, response: httpx.Response, send: Send) -> None:
        """vLLM's model list without the policy's adapter versions: which users have a
        personal adapter (their ids are in the names) is no client's business."""
        raw = await response.aread()
        try:
            listing = orjson.loads(raw)
            listing["data"] = [m for m in listing["data"] if not deps.router.private(m["id"])]
            raw = orjson.dumps(listing)
        except (orjson.JSONDecodeError, KeyError, TypeError):
            pass  # not vLLM's shape: passed on as it came
        headers = [(k, v) for k, v in downstream_headers(response) if k != b"content-length"]
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*headers, (b"content-length", str(len(raw)).encode())]})
        await send({"type": "http.response.body", "body": raw})

    async def _send(self, deps: Deps, scope: Scope, body: bytes) -> httpx.Response:
        headers = upstream_headers(scope["headers"], deps)
        query: bytes = scope.get("query_string", b"")

        async def post(backend: Backend) -> httpx.Response:
            request = backend.client.build_request(scope["method"], self.target(scope),
                                                   content=body, headers=headers)
            if query:
                request.url = request.url.copy_with(query=query)
            return await backend.client.send(request, stream=True)

        return (await deps.backends.send(post))[1]


def _model(body: bytes) -> object:
    """The ``model`` a JSON request body names, if any (vLLM judges the rest)."""
    if not body.lstrip().startswith(b"{"):
        return None
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return parsed.get("model") if isinstance(parsed, dict) else None


def routes() -> list[Route]:
    """The allowlisted inference endpoints that are forwarded as they are."""
    return [
        Route("/v1/responses/{response_id}/cancel",
              Forward("/v1/responses/{response_id}/cancel"), methods=["POST"]),
        Route("/v1/messages/count_tokens", Forward("/v1/messages/count_tokens"),
              methods=["POST"]),
        Route("/v1/models", Forward("/v1/models"), methods=["GET"]),
        Route("/v1/embeddings", Forward("/v1/embeddings"), methods=["POST"]),
        Route("/tokenize", Forward("/tokenize"), methods=["POST"]),
        Route("/detokenize", Forward("/detokenize"), methods=["POST"]),
    ]
