"""A prototype of a lean upstream transport for the proxy, measured by the benchmark.

proxy -> **transport** -> vLLM. httpx's default transport (httpcore) costs the proxy
most of its request-path CPU: per request it scans every pooled connection (a ``select``
and an anyio attribute lookup each), and it writes headers and body in two sends. This
`httpx.AsyncBaseTransport` keeps HTTP/1.1 keep-alive connections as asyncio protocols,
parses replies with httptools (as uvicorn does), writes each request in one send and
takes an idle connection in O(1). The proxy keeps using ``httpx.AsyncClient`` on top of
it, so nothing else changes. Not wired into the proxy: ``python -m bench.lean_transport
serve ...`` runs ``nextstate serve`` with it, as the benchmark's ``nextstate-lean``
target (``--lean``), to show what it would buy.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any, cast

import httptools
import httpx

_HIGH_WATER = 256 * 1024  # buffered reply bytes before reading pauses


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.headers: list[tuple[bytes, bytes]] = []
        self.status = 0
        self.head: asyncio.Future[None] | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = True
        self.error: Exception | None = None
        self.wakeup: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.status and not self.complete and not self._framed():
            self.complete = True  # a reply delimited by closing the connection
        elif not self.complete:
            self.error = httpx.RemoteProtocolError("the backend closed the connection")
        self._wake()

    def _framed(self) -> bool:
        return any(k.lower() in (b"content-length", b"transfer-encoding")
                   for k, _ in self.headers)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = httpx.RemoteProtocolError(f"unparseable reply: {exc}")
            self._wake()
            self.close()

    # -- httptools callbacks ------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        if self.head is not None and not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    def _wake(self) -> None:
        if self.head is not None and not self.head.done():
            if self.error is not None:
                self.head.set_exception(self.error)
            else:
                self.head.set_result(None)
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    # -- use ----------------------------------------------------------------------------

    def start(self, data: bytes) -> asyncio.Future[None]:
        assert self.transport is not None
        self.headers, self.status, self.complete, self.error = [], 0, False, None
        self.chunks.clear()
        self.buffered = 0
        self.head = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.head

    async def body(self, timeout: float | None) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        while True:
            while self.chunks:
                chunk = self.chunks.popleft()
                self.buffered -= len(chunk)
                if self.buffered <= _HIGH_WATER // 2 and self.transport is not None:
                    self.transport.resume_reading()
                yield chunk
            if self.complete:
                return
            if self.error is not None:
                raise self.error
            self.wakeup = loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self.wakeup
            except TimeoutError as exc:
                raise httpx.ReadTimeout("the backend sent nothing in time") from exc
            finally:
                self.wakeup = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _Body(httpx.AsyncByteStream):
    def __init__(self, transport: LeanTransport, key: tuple[str, int], conn: _Conn,
                 timeout: float | None) -> None:
        self.transport, self.key, self.conn, self.timeout = transport, key, conn, timeout
        self.released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.conn.body(self.timeout):
            yield chunk

    async def aclose(self) -> None:
        if not self.released:  # back to the pool once, and only if the reply is done
            self.released = True
            self.transport.release(self.key, self.conn)


class LeanTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 to one or a few backends, keep-alive, one send a request."""

    def __init__(self, max_idle: int = 256) -> None:
        self.idle: dict[tuple[str, int], list[_Conn]] = {}
        self.max_idle = max_idle

    async def _connect(self, key: tuple[str, int], timeout: float | None) -> _Conn:
        idle = self.idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(_Conn, key[0], key[1])
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {key[0]}:{key[1]} timed out") from exc
        except OSError as exc:
            raise httpx.ConnectError(f"{exc}") from exc
        return conn

    def release(self, key: tuple[str, int], conn: _Conn) -> None:
        idle = self.idle.setdefault(key, [])
        if conn.complete and conn.keep_alive and not conn.closed and len(idle) < self.max_idle:
            idle.append(conn)
        else:
            conn.close()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        url = request.url
        key = (url.host, url.port or (443 if url.scheme == "https" else 80))
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol("the lean transport speaks plain HTTP only")
        body = await request.aread()
        head = [b"%s %s HTTP/1.1\r\n" % (request.method.encode(), url.raw_path)]
        # The body is sent whole, so it is framed by its length, never chunked.
        head.extend(b"%s: %s\r\n" % (k, v) for k, v in request.headers.raw
                    if k.lower() not in (b"transfer-encoding", b"content-length"))
        if body or request.method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            head.append(b"content-length: %d\r\n" % len(body))
        data = b"".join(head) + b"\r\n" + body
        conn = await self._connect(key, timeouts.get("connect"))
        try:
            async with asyncio.timeout(timeouts.get("read")):
                await conn.start(data)
        except TimeoutError as exc:
            conn.close()
            raise httpx.ReadTimeout("the backend sent no reply in time") from exc
        except BaseException:
            conn.close()
            raise
        return httpx.Response(conn.status, headers=conn.headers,
                              stream=_Body(self, key, conn, timeouts.get("read")),
                              extensions={"http_version": b"HTTP/1.1"})

    async def aclose(self) -> None:
        for conns in self.idle.values():
            for conn in conns:
                conn.close()
        self.idle.clear()


def serve(argv: list[str]) -> None:
    """``nextstate serve`` arguments, served with the lean transport underneath."""
    import uvicorn

    from nextstate.proxy import cli
    from nextstate.proxy.app import make_app

    def run_proxy(settings: Any, host: str, port: int) -> None:
        app = make_app(settings, transport=LeanTransport())
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                      access_log=False, lifespan="on")).run()

    cli.run_proxy = run_proxy  # type: ignore[attr-defined]
    cli.main(["serve", *argv])


if __name__ == "__main__":
    serve(sys.argv[2:] if sys.argv[1:2] == ["serve"] else sys.argv[1:])
