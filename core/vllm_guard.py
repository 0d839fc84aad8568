"""A key on every path of vLLM's server, not only on ``/v1`` (runs inside vLLM).

vLLM's own ``--api-key`` (or ``VLLM_API_KEY``) guards only paths under ``/v1``, ``/v2``,
``/inference`` and ``/cohere``. Measured on vLLM 0.32 with a key set, these still answer
anyone: ``/tokenize``, ``/detokenize``, ``/metrics``, ``/version``, ``/load``, ``/ping``,
``/invocations`` (SageMaker's inference route) and, with runtime LoRA updating on (which
nextstate needs), SageMaker's ``POST /adapters`` and ``DELETE /adapters/{name}``: an
adapter loader open to whoever reaches the port. Given to vLLM as
``--middleware nextstate.core.vllm_guard.RequireKey``, this middleware asks for
``Authorization: Bearer $VLLM_API_KEY`` on every path but ``GET /health``.

vLLM builds it with no arguments, so the key comes from the environment, where vLLM
reads its own. It imports nothing of nextstate's, so it loads in any environment that
has the ``nextstate`` package installed (no extras needed).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

KEY_ENV = "VLLM_API_KEY"
OPEN = frozenset({"/health"})
_REFUSED = b'{"error":{"message":"Unauthorized","type":"authentication_error","param":null,' \
    b'"code":401}}'


class RequireKey:
    def __init__(self, app: ASGIApp) -> None:
        key = os.environ.get(KEY_ENV)
        if not key:
            raise RuntimeError(f"nextstate.core.vllm_guard.RequireKey needs {KEY_ENV} set "
                               "to the key clients must send")
        self.app = app
        self.digest = hashlib.sha256(key.encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or (
                scope["path"] in OPEN and scope.get("method") == "GET"):
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(
                hashlib.sha256(token).digest(), self.digest):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(_REFUSED)).encode())]})
        await send({"type": "http.response.body", "body": _REFUSED})
