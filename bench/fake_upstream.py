"""A fast, deterministic vLLM-shaped upstream for the proxy benchmark.

load generator -> (proxy ->) **fake upstream**. It stands where vLLM stands, answering
``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming and not) the way
vLLM 0.32 does: ``prompt_token_ids`` and per-choice ``token_ids`` when asked for
(``null`` otherwise), sampled-token logprobs, the usage chunk with ``include_usage`` and
``system_fingerprint`` moved onto it. Every reply has ``COMPLETION_TOKENS`` tokens, so a
stream is a role chunk, that many content chunks, maybe a usage chunk and ``[DONE]``.

So that the upstream costs almost nothing, it is raw asyncio with httptools' parser and
replies are built once per distinct request shape and cached as bytes. A stream is
written one event per loop iteration (each its own ``send``), as a real server does.
``GET /health`` and ``GET /v1/models`` answer too. It binds loopback only.

Run: ``python -m bench.fake_upstream --port 8500``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
from collections.abc import Coroutine
from typing import Any, TypeVar, cast

import httptools
import orjson

COMPLETION_TOKENS = 32
CREATED = 1_700_000_000
FINGERPRINT = "fp_bench"
PIECES = [f" w{i}" for i in range(COMPLETION_TOKENS)]
TOKEN_IDS = [1000 + i for i in range(COMPLETION_TOKENS)]
LOGPROBS = [-0.05 - 0.1 * (i % 7) for i in range(COMPLETION_TOKENS)]
T = TypeVar("T")
_CACHE_LIMIT = 256  # distinct request shapes kept (the bench uses a handful)


def _prompt_tokens(body: dict[str, Any]) -> int:
    """A deterministic stand-in for tokenisation: four characters a token."""
    messages = body.get("messages")
    if isinstance(messages, list):
        chars = sum(len(str(m.get("content") or "")) for m in messages if isinstance(m, dict))
    else:
        chars = len(str(body.get("prompt") or ""))
    return max(1, chars // 4)


def _shape(path: str, body: dict[str, Any]) -> tuple[Any, ...]:
    """Everything a reply depends on; the cache key."""
    options = body.get("stream_options")
    lp = body.get("logprobs")
    return (path, bool(body.get("stream")), str(body.get("model")),
            bool(body.get("return_token_ids")), lp is not None and lp is not False,
            isinstance(options, dict) and bool(options.get("include_usage")),
            min(COMPLETION_TOKENS, int(body.get("max_tokens") or COMPLETION_TOKENS)),
            _prompt_tokens(body))


def _logprob(i: int, chat: bool) -> dict[str, Any]:
    if chat:
        return {"content": [{"token": PIECES[i], "logprob": LOGPROBS[i],
                             "bytes": list(PIECES[i].encode()), "top_logprobs": []}]}
    return {"text_offset": [0], "token_logprobs": [LOGPROBS[i]], "tokens": [PIECES[i]],
            "top_logprobs": [{PIECES[i]: LOGPROBS[i]}]}


def _usage(prompt: int, n: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "total_tokens": prompt + n, "completion_tokens": n,
            "prompt_tokens_details": None}


def whole_reply(shape: tuple[Any, ...]) -> dict[str, Any]:
    """The non-streaming JSON for a request shape."""
    path, _, model, ids, lp, _, n, prompt = shape
    chat = path.endswith("/chat/completions")
    prompt_ids = list(range(100, 100 + prompt)) if ids else None
    text = "".join(PIECES[:n])
    logprobs: Any = None
    if lp and chat:
        logprobs = {"content": [_logprob(i, True)["content"][0] for i in range(n)]}
    elif lp:
        top = [{p: v} for p, v in zip(PIECES[:n], LOGPROBS[:n], strict=True)]
        logprobs = {"text_offset": list(range(n)), "token_logprobs": LOGPROBS[:n],
                    "tokens": PIECES[:n], "top_logprobs": top}
    choice: dict[str, Any] = {"index": 0}
    if chat:
        choice["message"] = {"role": "assistant", "content": text, "refusal": None,
                             "annotations": None, "audio": None, "function_call": None,
                             "tool_calls": [], "reasoning_content": None}
    else:
        choice["text"] = text
    choice.update({"logprobs": logprobs, "finish_reason": "length", "stop_reason": None,
                   "token_ids": TOKEN_IDS[:n] if ids else None})
    if not chat:
        choice.update({"prompt_logprobs": None, "prompt_token_ids": prompt_ids})
    out = {"id": "cmpl-bench", "object": "chat.completion" if chat else "text_completion",
           "created": CREATED, "model": model, "choices": [choice], "service_tier": None,
           "system_fingerprint": FINGERPRINT, "usage": _usage(prompt, n),
           "prompt_logprobs": None, "kv_transfer_params": None}
    if chat:
        out["prompt_token_ids"] = prompt_ids
    return out


def stream_events(shape: tuple[Any, ...]) -> list[dict[str, Any]]:
    """The stream's chunks (without ``[DONE]``) for a request shape."""
    path, _, model, ids, lp, usage, n, prompt = shape
    chat = path.endswith("/chat/completions")
    base = {"id": "cmpl-bench", "object": "chat.completion.chunk" if chat else
            "text_completion", "created": CREATED, "model": model}
    prompt_ids = list(range(100, 100 + prompt)) if ids else None
    events: list[dict[str, Any]] = []
    if chat:
        events.append({**base, "choices": [{"index": 0, "delta": {
            "role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}],
            "prompt_token_ids": prompt_ids})
    for i in range(n):
        last = i == n - 1
        choice: dict[str, Any] = {"index": 0}
        if chat:
            choice["delta"] = {"content": PIECES[i]}
        else:
            choice["text"] = PIECES[i]
        choice.update({"logprobs": _logprob(i, chat) if lp else None,
                       "finish_reason": "length" if last else None,
                       "stop_reason": None,
                       "token_ids": [TOKEN_IDS[i]] if ids else None})
        if not chat and i == 0:
            choice["prompt_token_ids"] = prompt_ids
        chunk: dict[str, Any] = {**base, "choices": [choice]}
        if last and not usage:
            chunk["system_fingerprint"] = FINGERPRINT
        events.append(chunk)
    if usage:
        events.append({**base, "choices": [], "usage": _usage(prompt, n),
                       "system_fingerprint": FINGERPRINT})
    return events


def _head(status: int, content_type: bytes, length: int | None) -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}.get(status, b"Error")
    framing = (b"transfer-encoding: chunked" if length is None
               else b"content-length: " + str(length).encode())
    return (b"HTTP/1.1 %d %s\r\nserver: fake-upstream\r\ncontent-type: %s\r\n%s\r\n\r\n"
            % (status, reason, content_type, framing))


class Replies:
    """Bytes to send for each request shape, built on first use."""

    def __init__(self) -> None:
        self._whole: dict[tuple[Any, ...], bytes] = {}
        self._stream: dict[tuple[Any, ...], list[bytes]] = {}

    def whole(self, shape: tuple[Any, ...]) -> bytes:
        out = self._whole.get(shape)
        if out is None:
            body = orjson.dumps(whole_reply(shape))
            out = _head(200, b"application/json", len(body)) + body
            if len(self._whole) < _CACHE_LIMIT:
                self._whole[shape] = out
        return out

    def stream(self, shape: tuple[Any, ...]) -> list[bytes]:
        """The head with the first event, then one framed event per write, then the end."""
        out = self._stream.get(shape)
        if out is None:
            events = [b"data: " + orjson.dumps(e) + b"\n\n" for e in stream_events(shape)]
            events.append(b"data: [DONE]\n\n")
            framed = [b"%x\r\n%s\r\n" % (len(e), e) for e in events]
            head = _head(200, b"text/event-stream; charset=utf-8", None)
            out = [head + framed[0], *framed[1:-1], framed[-1] + b"0\r\n\r\n"]
            if len(self._stream) < _CACHE_LIMIT:
                self._stream[shape] = out
        return out


def _json(status: int, obj: Any) -> bytes:
    body = orjson.dumps(obj)
    return _head(status, b"application/json", len(body)) + body


class _Connection(asyncio.Protocol):
    """One client connection: parse requests with httptools, answer from `Replies`."""

    def __init__(self, replies: Replies, chunk_delay: float) -> None:
        self.replies = replies
        self.chunk_delay = chunk_delay
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.streaming: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.streaming is not None:
            self.streaming.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        method, path = self.parser.get_method(), self.url.split(b"?")[0].decode()
        raw, self.url, self.body = b"".join(self.body), b"", []
        keep = self.parser.should_keep_alive()
        if method == b"GET" and path == "/health":
            self._send(_head(200, b"application/json", 0), keep)
        elif method == b"GET" and path == "/v1/models":
            self._send(_json(200, {"object": "list", "data": [
                {"id": "bench-model", "object": "model", "owned_by": "bench"}]}), keep)
        elif method == b"POST" and path in ("/v1/chat/completions", "/v1/completions"):
            try:
                body = orjson.loads(raw)
                shape = _shape(path, body)
            except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
                self._send(_json(400, {"error": {"message": "bad request body",
                                                 "type": "BadRequestError", "code": 400}}),
                           keep)
                return
            if shape[1]:
                self.streaming = asyncio.ensure_future(
                    self._stream(self.replies.stream(shape), keep))
            else:
                self._send(self.replies.whole(shape), keep)
        else:
            self._send(_json(404, {"error": {"message": f"no route {path}",
                                             "type": "NotFoundError", "code": 404}}), keep)

    def _send(self, data: bytes, keep: bool) -> None:
        assert self.transport is not None
        self.transport.write(data)
        if not keep:
            self.transport.close()

    async def _stream(self, parts: list[bytes], keep: bool) -> None:
        assert self.transport is not None
        for part in parts[:-1]:
            self.transport.write(part)
            # Yield so each event leaves in its own send, as tokens would.
            await asyncio.sleep(self.chunk_delay)
            if self.transport.is_closing():
                return
        self._send(parts[-1], keep)
        self.streaming = None


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def serve(port: int, host: str = "127.0.0.1", chunk_delay: float = 0.0,
                ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled."""
    loop = asyncio.get_running_loop()
    replies = Replies()
    server = await loop.create_server(lambda: _Connection(replies, chunk_delay), host, port,
                                      backlog=1024, reuse_address=True)
    if ready is not None:
        ready.set()
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0,
                        help="pause between stream events (default 0: just yield)")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        run(serve(args.port, args.host, args.chunk_delay_ms / 1000))


if __name__ == "__main__":
    main()
