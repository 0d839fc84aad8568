"""The one client for nextstate's own calls to a vLLM backend (proxy, learner -> vLLM).

The proxy relays client requests itself (``proxy/relay.py``). Everything else that the
proxy, the learner or the CLI asks a vLLM server goes through `VLLMClient`: health, the
model list, loading, unloading and checking adapters, ``/tokenize`` and ``/detokenize``,
and scoring with ``/v1/completions`` (teacher logprobs). It sends the backend's key on
every call, gives every call a timeout, and retries what is safe to retry. Every call
here is idempotent (loading an adapter that is already loaded counts as loaded,
unloading one that is not loaded counts as done, tokenizing and scoring change
nothing), so a call that got no answer, or a 502, 503 or 504, is tried again up to
``retries`` times. Health checks are never retried: their answer is about now.

    VLLMError              base; ``url`` is the backend
     ├── VLLMUnreachable   no answer (refused, timed out, connection lost)
     └── VLLMRefused       an answer other than success; ``status`` and vLLM's ``body``
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

# What vLLM 0.32 answers when an adapter is loaded under a name it already has (400)
# and when it unloads a name it does not have (404): both mean the adapter is where
# the caller wants it.
ALREADY_LOADED = "has already been loaded"
NOT_LOADED = "cannot be found"
_RETRY_STATUS = frozenset({502, 503, 504})


class VLLMError(Exception):
    def __init__(self, url: str, message: str) -> None:
        super().__init__(f"vLLM at {url}: {message}")
        self.url = url


class VLLMUnreachable(VLLMError):
    """No answer. ``nothing_sent``: the connection was never made (refused, or the
    connect timed out), so the request cannot have reached vLLM."""

    def __init__(self, url: str, message: str, *, nothing_sent: bool) -> None:
        super().__init__(url, message)
        self.nothing_sent = nothing_sent


class VLLMRefused(VLLMError):
    """``asked``: what was asked, in words (``load adapter p@000003``)."""

    def __init__(self, url: str, asked: str, status: int, body: str) -> None:
        super().__init__(url, f"refused to {asked}: {status} {body[:300]}")
        self.status = status
        self.body = body


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


class VLLMClient:
    """nextstate's calls to one vLLM server.

    ``http``: an httpx client to share (the proxy passes the one its relay uses for
    this backend, so both use one pool of connections); it stays open on `aclose`.
    Without one, the client makes and owns its own.
    """

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 30.0,
                 load_timeout: float = 120.0, retries: int = 2, backoff: float = 0.25,
                 http: httpx.AsyncClient | None = None) -> None:
        self.url = base_url.rstrip("/")
        self.timeout = timeout
        self.load_timeout = load_timeout
        self.retries = retries
        self.backoff = backoff
        self._headers = auth_headers(api_key)
        self._owned = http is None
        # Idle connections expire before vLLM's own 5 s keep-alive does: a request sent
        # on a connection the server is closing gets a reset (the ReadError that once
        # ended a benchmark run, see bench/README).
        self.http = http if http is not None else httpx.AsyncClient(
            base_url=self.url, timeout=timeout, limits=httpx.Limits(keepalive_expiry=4.0))

    async def aclose(self) -> None:
        if self._owned:
            await self.http.aclose()

    # -- the calls ------------------------------------------------------------------------

    async def health(self, timeout: float = 5.0) -> bool:
        """Does the server answer ``GET /health`` with 200 (once, now)?"""
        try:
            answer = await self.http.get(f"{self.url}/health", headers=self._headers,
                                         timeout=timeout)
        except httpx.HTTPError:
            return False
        return answer.status_code == 200

    async def models(self) -> set[str]:
        """The names it serves: the base model and every adapter loaded."""
        data = (await self._json("GET", "/v1/models")).get("data")
        return {m["id"] for m in data if isinstance(m, dict) and "id" in m} \
            if isinstance(data, list) else set()

    async def max_model_len(self) -> int | None:
        """The context length it serves (the first model in ``/v1/models`` that says)."""
        data = (await self._json("GET", "/v1/models")).get("data")
        for model in data if isinstance(data, list) else []:
            if isinstance(model, dict) and isinstance(model.get("max_model_len"), int):
                return int(model["max_model_len"])
        return None

    async def load_adapter(self, name: str, path: str) -> None:
        """Load the LoRA adapter in directory ``path`` as ``name`` (done when it already
        has ``name``: versions are immutable, so the same name is the same weights)."""
        answer = await self._call("POST", "/v1/load_lora_adapter", timeout=self.load_timeout,
                                  json={"lora_name": name, "lora_path": path})
        if answer.status_code != 200 and not (answer.status_code == 400
                                              and ALREADY_LOADED in answer.text):
            raise VLLMRefused(self.url, f"load adapter {name}", answer.status_code, answer.text)

    async def unload_adapter(self, name: str) -> bool:
        """Unload ``name``; False when it was not loaded."""
        answer = await self._call("POST", "/v1/unload_lora_adapter", json={"lora_name": name})
        if answer.status_code == 200:
            return True
        if answer.status_code == 404 and NOT_LOADED in answer.text:
            return False
        raise VLLMRefused(self.url, f"unload adapter {name}", answer.status_code, answer.text)

    async def tokenize(self, body: dict[str, Any]) -> list[int]:
        """``POST /tokenize``: the token ids of a prompt or of chat messages, built as
        vLLM builds them for generation."""
        tokens = (await self._json("POST", "/tokenize", body)).get("tokens")
        if not isinstance(tokens, list):
            raise VLLMRefused(self.url, "tokenize", 200, "an answer without tokens")
        return [int(t) for t in tokens]

    async def detokenize(self, model: str, tokens: list[int]) -> str:
        """``POST /detokenize``: the text of these token ids (the dashboard shows each
        recorded token's text this way)."""
        text = (await self._json("POST", "/detokenize", {"model": model,
                                                           "tokens": tokens})).get("prompt")
        if not isinstance(text, str):
            raise VLLMRefused(self.url, "detokenize", 200, "an answer without text")
        return text

    async def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/completions``, not streamed (scoring: ``prompt_logprobs``)."""
        return await self._json("POST", "/v1/completions", body)

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """``POST path`` for a route with no call of its own here (the image teacher's
        render and token-in scoring, which change nothing either)."""
        return await self._json("POST", path, body)

    # -- one request ------------------------------------------------------------------------

    async def _json(self, method: str, path: str, body: dict[str, Any] | None = None,
                    ) -> dict[str, Any]:
        answer = await self._call(method, path, json=body)
        asked = f"answer {method} {path}"
        if answer.status_code != 200:
            raise VLLMRefused(self.url, asked, answer.status_code, answer.text)
        try:
            found = answer.json()
        except ValueError as exc:
            raise VLLMRefused(self.url, asked, 200, "an answer that is not JSON") from exc
        if not isinstance(found, dict):
            raise VLLMRefused(self.url, asked, 200, "an answer that is not a JSON object")
        return found

    async def _call(self, method: str, path: str, *, json: dict[str, Any] | None = None,
                    timeout: float | None = None) -> httpx.Response:
        """One call, tried again (after a short pause) on no answer or a 502/503/504."""
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                answer = await self.http.request(method, f"{self.url}{path}", json=json,
                                                 headers=self._headers,
                                                 timeout=timeout or self.timeout)
            except httpx.TransportError as exc:
                if last:
                    raise VLLMUnreachable(
                        self.url, f"{path}: {type(exc).__name__}: {exc}",
                        nothing_sent=isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout),
                    ) from exc
            else:
                if last or answer.status_code not in _RETRY_STATUS:
                    return answer
            await asyncio.sleep(self.backoff * 2 ** attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")
