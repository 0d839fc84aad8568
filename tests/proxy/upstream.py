"""The vLLM-shaped fake (`fake_vllm.FakeVLLM`) over real HTTP, recording every request
target exactly as it arrived on the wire: uvicorn on a daemon thread, for tests that
need the proxy's real transport and URL handling between the client and vLLM."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import uvicorn

from nextstate.core.vllm_server import free_port
from tests.proxy.fake_vllm import FakeVLLM


class RecordingUpstream:
    def __init__(self, fake: FakeVLLM | None = None) -> None:
        self.fake = fake or FakeVLLM()
        self.targets: list[tuple[str, str]] = []  # (method, raw target with its query)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off",
            interface="asgi3",
            access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def paths(self) -> list[str]:
        return [target.split("?", 1)[0] for _, target in self.targets]

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        query = scope["query_string"].decode("latin-1")
        self.targets.append((scope["method"], raw + ("?" + query if query else "")))
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = httpx.Request(scope["method"], f"http://vllm{raw}", content=body,
                                headers=[(k, v) for k, v in scope["headers"]
                                         if k not in (b"host", b"content-length")])
        response = self.fake(request)
        content = await response.aread()
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": [(k.lower(), v) for k, v in response.headers.raw
                                if k.lower() not in (b"content-length",
                                                     b"transfer-encoding")]})
        await send({"type": "http.response.body", "body": content})

    def start(self) -> RecordingUpstream:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the fake upstream did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def __enter__(self) -> RecordingUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def black_hole() -> Iterator[str]:
    """The URL of a listener that takes no new connection: a replica that drops SYNs.

    It listens with a backlog of 0 and never accepts; the connections made here fill its
    accept queue, and Linux drops the SYNs of any connection after them, so a client's
    connect times out (rather than being refused)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        time.sleep(0.05)  # the handshakes of the first ones complete
        yield f"http://127.0.0.1:{port}"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
