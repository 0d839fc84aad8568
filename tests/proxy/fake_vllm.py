"""A vLLM-shaped fake upstream for unit tests (httpx.MockTransport handler).

It answers like vLLM 0.32 does, including the ``null`` token ids and logprobs that vLLM
returns when they were not asked for, so that transparency can be checked without a
server. Integration tests use the real vLLM.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson

from nextstate.core.vllm import VLLMClient

REPLY = ["Hel", "lo", "!"]
TOKEN_IDS = [11, 12, 13]
LOGPROBS = [-0.5, -0.25, -0.125]
PROMPT_IDS = [1, 2, 3, 4]
FINGERPRINT = "vllm-fake"
MAX_MODEL_LEN = 2048


class FakeVLLM:
    """``api_key``: like a vLLM started with a key (and nextstate's guard), every path but
    ``/health`` wants it; requests without it get a 401 and are kept in ``unauthorized``."""

    def __init__(self, api_key: str | None = None) -> None:
        self.requests: list[dict[str, Any]] = []  # what clients sent (through the proxy)
        self.headers: list[httpx.Headers] = []
        self.admin: list[tuple[str, dict[str, Any]]] = []  # adapter loads and unloads
        self.loaded: set[str] = set()
        self.fail_with: int | None = None
        self.api_key = api_key
        self.unauthorized: list[str] = []  # "METHOD path" of requests without the key

    def client(self, url: str = "http://vllm", key: str | None = None) -> VLLMClient:
        """nextstate's own vLLM client, talking to this fake (no retries)."""
        return VLLMClient(url, key, retries=0, http=httpx.AsyncClient(
            transport=httpx.MockTransport(self)))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.api_key is not None and request.url.path != "/health" and request.headers.get(
                "authorization") != f"Bearer {self.api_key}":
            self.unauthorized.append(f"{request.method} {request.url.path}")
            return httpx.Response(401, json={"error": "Unauthorized"})
        body = orjson.loads(request.content) if request.content else {}
        if request.url.path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            self.admin.append((request.url.path, body))
            name = body["lora_name"]
            if request.url.path.startswith("/v1/load"):
                if name in self.loaded:  # as vLLM 0.32 words it
                    return httpx.Response(400, json={"error": {
                        "message": f"The lora adapter '{name}' has already been loaded.",
                        "type": "InvalidUserInput", "param": None, "code": 400}})
                self.loaded.add(name)
            elif name in self.loaded:
                self.loaded.discard(name)
            else:
                return httpx.Response(404, json={"error": {
                    "message": f"The lora adapter '{name}' cannot be found.",
                    "type": "NotFoundError", "param": None, "code": 404}})
            return httpx.Response(200, text="Success")
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [
                {"id": name, "max_model_len": MAX_MODEL_LEN}
                for name in ["toy", *sorted(self.loaded)]]})
        if request.url.path == "/health":
            return httpx.Response(200)
        if request.url.path == "/detokenize":  # a token's text: "<id>"
            tokens = body.get("tokens")
            if not isinstance(tokens, list):
                return httpx.Response(400, json={"error": {
                    "message": "tokens: field required", "type": "BadRequestError",
                    "param": None, "code": 400}})
            return httpx.Response(200, json={"prompt": "".join(f"<{t}>" for t in tokens)})
        if request.url.path == "/tokenize":
            return httpx.Response(200, json={"count": len(PROMPT_IDS), "tokens": PROMPT_IDS})
        self.requests.append(body)
        self.headers.append(request.headers)
        if self.fail_with is not None:
            return httpx.Response(self.fail_with, json={"error": {
                "message": "boom", "type": "BadRequestError", "param": None,
                "code": self.fail_with}})
        chat = request.url.path.endswith("/chat/completions")
        if body.get("stream"):
            return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                  content=_chunked(self.stream_bytes(body, chat)))
        return httpx.Response(200, json=self.whole(body, chat))

    def _lp(self, body: dict[str, Any], i: int, chat: bool) -> Any:
        if chat and body.get("logprobs"):
            return {"content": [{"token": REPLY[i], "logprob": LOGPROBS[i],
                                 "bytes": list(REPLY[i].encode()), "top_logprobs": []}]}
        return None

    def whole(self, body: dict[str, Any], chat: bool) -> dict[str, Any]:
        ids = body.get("return_token_ids")
        lp = None
        if chat and body.get("logprobs"):
            lp = {"content": [self._lp(body, i, chat)["content"][0] for i in range(3)]}
        choice: dict[str, Any] = {"index": 0}
        if chat:
            choice["message"] = {"role": "assistant", "content": "".join(REPLY),
                                 "refusal": None, "tool_calls": []}
        else:
            choice["text"] = "".join(REPLY)
        choice.update({"logprobs": lp, "finish_reason": "stop", "stop_reason": None,
                       "token_ids": TOKEN_IDS if ids else None})
        return {"id": "cmpl-1", "object": "chat.completion", "created": 1, "model": body.get(
            "model"), "choices": [choice], "system_fingerprint": FINGERPRINT,
            "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7},
            "prompt_token_ids": PROMPT_IDS if ids else None}

    def stream_bytes(self, body: dict[str, Any], chat: bool) -> bytes:
        ids = body.get("return_token_ids")
        usage = (body.get("stream_options") or {}).get("include_usage")
        base = {"id": "c1", "object": "chat.completion.chunk", "created": 1,
                "model": body.get("model")}
        events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                               "content": ""},
                                        "logprobs": None, "finish_reason": None}],
                   "prompt_token_ids": PROMPT_IDS if ids else None}]
        for i, piece in enumerate(REPLY):
            last = i == len(REPLY) - 1
            chunk: dict[str, Any] = {**base, "choices": [{
                "index": 0, "delta": {"content": piece}, "logprobs": self._lp(body, i, chat),
                "finish_reason": "stop" if last else None,
                "token_ids": [TOKEN_IDS[i]] if ids else None}]}
            if last and not usage:
                chunk["system_fingerprint"] = FINGERPRINT
            events.append(chunk)
        if usage:
            events.append({**base, "choices": [], "usage": {
                "prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7},
                "system_fingerprint": FINGERPRINT})
        out = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)
        return out + b"data: [DONE]\n\n"


async def _chunked(data: bytes) -> AsyncIterator[bytes]:
    """Yield the stream event by event, as a server sends it."""
    for event in data.split(b"\n\n"):
        if event:
            yield event + b"\n\n"
