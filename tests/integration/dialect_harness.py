"""A translating front for the real vLLM: Messages and Responses spoken over its chat route.

agent -> **harness** -> vLLM ``/v1/chat/completions``. It does what the recorded relay will
do with the dialect translators (`nextstate.proxy.dialects`), minus the recording: the
dialect request is translated, capture is turned on exactly as the relay turns it on
(`capture.add_capture`: token ids, logprobs, the usage chunk), the chat answer is
translated back, whole or one chunk at a time. The parity tests point the official SDKs
and plain HTTP at it, and at vLLM's own dialect routes, and compare what comes back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from nextstate.core.vllm_server import free_port
from nextstate.proxy.capture import add_capture
from nextstate.proxy.dialects import anthropic, responses
from nextstate.proxy.dialects.anthropic_stream import MessagesStream
from nextstate.proxy.dialects.conversation import Kept, expand, keep
from nextstate.proxy.dialects.responses_stream import ResponsesStream
from nextstate.proxy.errors import ProxyError


class DialectHarness:
    def __init__(self, vllm_url: str, served: responses.Served) -> None:
        self.vllm_url = vllm_url
        self.served = served
        self.kept: dict[str, Kept] = {}  # previous_response_id, as the store will keep it
        self.chat_requests: list[dict[str, Any]] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = Starlette(routes=[Route("/v1/messages", self._messages, methods=["POST"]),
                                Route("/v1/responses", self._responses, methods=["POST"])])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> DialectHarness:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    async def _messages(self, request: Request) -> Response:
        try:
            body = orjson.loads(await request.body())
            chat = anthropic.to_chat(body)
        except ProxyError as exc:
            return Response(exc.body("anthropic"), exc.status, media_type="application/json")
        if body.get("stream"):
            stream = MessagesStream()
            return await self._stream(chat, stream.feed, stream.done,
                                      anthropic.error_from_chat)
        status, answer = await self._whole(chat)
        if status != 200:
            return Response(anthropic.error_from_chat(status, answer), status,
                            media_type="application/json")
        try:
            out = anthropic.from_chat(orjson.loads(answer))
        except ProxyError as exc:
            return Response(exc.body("anthropic"), exc.status, media_type="application/json")
        return Response(orjson.dumps(out), media_type="application/json")

    async def _responses(self, request: Request) -> Response:
        try:
            body = expand(orjson.loads(await request.body()), self.kept.get)
            chat = responses.to_chat(body)
        except ProxyError as exc:
            return Response(exc.body(), exc.status, media_type="application/json")
        if body.get("stream"):
            stream = ResponsesStream(body, self.served)

            def done() -> bytes:
                out = stream.done()
                if stream.final is not None and body.get("store") is not False:
                    self.kept[stream.final["id"]] = keep(body, stream.final)
                return out

            return await self._stream(chat, stream.feed, done, lambda s, b: b)
        status, answer = await self._whole(chat)
        if status != 200:  # vLLM's Responses errors have the chat route's shape
            return Response(answer, status, media_type="application/json")
        out = responses.from_chat(orjson.loads(answer), body, self.served)
        if body.get("store") is not False:
            self.kept[out["id"]] = keep(body, out)
        return Response(orjson.dumps(out), media_type="application/json")

    async def _whole(self, chat: dict[str, Any]) -> tuple[int, bytes]:
        add_capture(chat, "chat")
        self.chat_requests.append(chat)
        async with httpx.AsyncClient(timeout=120) as client:
            answer = await client.post(f"{self.vllm_url}/v1/chat/completions", json=chat)
        return answer.status_code, answer.content

    async def _stream(self, chat: dict[str, Any], feed: Any, done: Any, error: Any) -> Response:
        add_capture(chat, "chat")
        self.chat_requests.append(chat)
        client = httpx.AsyncClient(timeout=120)
        upstream = await client.send(client.build_request(
            "POST", f"{self.vllm_url}/v1/chat/completions", json=chat), stream=True)
        if upstream.status_code != 200:
            body = await upstream.aread()
            await upstream.aclose()
            await client.aclose()
            return Response(error(upstream.status_code, body), upstream.status_code,
                            media_type="application/json")

        async def events() -> AsyncIterator[bytes]:
            pending = b""
            try:
                async for data in upstream.aiter_bytes():
                    *complete, pending = (pending + data).split(b"\n\n")
                    for event in complete:
                        payload = event.removeprefix(b"data:").strip()
                        out = done() if payload == b"[DONE]" else feed(orjson.loads(payload))
                        if out:
                            yield out
            finally:
                await upstream.aclose()
                await client.aclose()

        return StreamingResponse(events(), media_type="text/event-stream")
