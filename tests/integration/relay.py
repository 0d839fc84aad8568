"""A relay in front of the real vLLM that can hold one request, for the learner's kill
tests (learner -> **relay** -> vLLM): the test waits until the learner is stuck at the
moment it wants (a teacher call mid-judge, an adapter load mid-publish), kills it there,
then lets the relay go on."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from nextstate.core.vllm_server import free_port

# (method, path) -> hold it "before" sending it to vLLM, "after" vLLM answered, or not (None)
Rule = Callable[[str, str], str | None]
_HOP = {"content-length", "transfer-encoding", "connection", "host", "content-encoding"}


class Relay:
    def __init__(self, target: str) -> None:
        self.target = target
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.rule: Rule | None = None  # fires once
        self.held = threading.Event()  # a request is being held
        self.release = threading.Event()
        self.seen: list[tuple[str, str]] = []
        app = Starlette(routes=[Route("/{path:path}", self._relay,
                                      methods=["GET", "POST", "PUT", "DELETE"])])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Relay:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def hold(self, rule: Rule) -> None:
        self.held.clear()
        self.release.clear()
        self.rule = rule

    async def _wait_for_release(self) -> None:
        self.held.set()
        while not self.release.is_set():
            await asyncio.sleep(0.05)

    async def _relay(self, request: Request) -> Response:
        method, path = request.method, request.url.path
        self.seen.append((method, path))
        when = self.rule(method, path) if self.rule is not None else None
        if when is not None:
            self.rule = None
        if when == "before":
            await self._wait_for_release()
        async with httpx.AsyncClient(base_url=self.target, timeout=300) as client:
            answer = await client.request(
                method, path, params=request.query_params, content=await request.body(),
                headers={k: v for k, v in request.headers.items() if k not in _HOP})
        if when == "after":
            await self._wait_for_release()
        return Response(answer.content, status_code=answer.status_code, headers={
            k: v for k, v in answer.headers.items() if k.lower() not in _HOP})
