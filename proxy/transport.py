"""The proxy's upstream transport: keep-alive HTTP/1.1 to vLLM, one write a request.

agent -> proxy -> **transport** -> vLLM. Each backend has an `UpstreamClient`, an
``httpx.AsyncClient`` (URLs, timeouts, the API the code is written against) whose
`send_direct` lets the relay skip the client's own layers, over an `UpstreamTransport`.
httpx's default transport (httpcore) cost the proxy most of its
request-path CPU: per request it scans every pooled connection, it writes head and body
in two sends, and each streamed chunk crosses several layers. Here a connection is an
asyncio protocol whose replies httptools parses (as uvicorn parses requests), a request
goes out in one write, and an idle connection is taken in O(1).

What it keeps of httpx's behaviour: connections are reused (keep-alive; an idle one
expires after ``keepalive_expiry``); a reply streams (body bytes are handed on as they
arrive, and reading pauses while the reader falls behind); closing a reply before its end
closes the connection (which is how vLLM learns that the client left, and aborts the
request); the connect and read timeouts (read: the longest wait for the next bytes); and
httpx's errors:

    ConnectError, ConnectTimeout   nothing was sent (the relay fails over on these)
    ReadTimeout                    the backend went quiet for longer than the read timeout
    RemoteProtocolError            the backend closed the connection early or sent garbage
    LocalProtocolError             a header that would split the request (CR or LF in it)

A request on a reused connection that the backend closed before answering it (an idle
connection it had just timed out) is sent again once, on a new connection. HTTP/1.1 over
TCP, with or without TLS; no HTTP proxies, no HTTP/2.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import cast

import httptools
import httpx

HIGH_WATER = 256 * 1024  # reply bytes buffered before reading pauses
# The errors after which the backend cannot have seen the request: safe to send it to
# another replica. (ConnectTimeout is not a subclass of ConnectError.)
NOTHING_SENT: tuple[type[httpx.TransportError], ...] = (httpx.ConnectError,
                                                        httpx.ConnectTimeout)
_BODYLESS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE"})
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})

Key = tuple[str, str, int]  # scheme, host, port


class _Connection(asyncio.Protocol):
    """One connection to a backend; one exchange at a time, then back to the pool."""

    transport: asyncio.Transport | None
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    chunks: deque[bytes]
    buffered: int
    received: bool
    complete: bool
    keep_alive: bool
    interim: bool
    error: httpx.TransportError | None
    head: asyncio.Future[None] | None
    waiter: asyncio.Future[None] | None

    def __init__(self, key: Key) -> None:
        self.key = key
        self.parser = httptools.HttpResponseParser(self)
        self.transport = None
        self.closed = False
        self.active = False  # an exchange is under way
        self.paused = False
        self.reused = False
        self.idle_since = 0.0
        self.chunks = deque()
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.reason = b""
        self.headers = []
        self.chunks.clear()
        self.buffered = 0
        self.received = False
        self.complete = False
        self.keep_alive = True
        self.interim = False
        self.error = None
        self.head = None
        self.waiter = None

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.active or self.complete or self.error is not None:
            return
        if self.status and not any(k.lower() in _FRAMING for k, _ in self.headers):
            self.complete = True  # a reply delimited by the end of the connection
        elif self.status:
            self.error = httpx.RemoteProtocolError(
                "the backend closed the connection before the reply was complete")
        else:
            self.error = httpx.RemoteProtocolError(
                "Server disconnected without sending a response.")
        self._wake()

    def data_received(self, data: bytes) -> None:
        if not self.active:  # bytes nobody asked for: this connection cannot be trusted
            self.close()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = httpx.RemoteProtocolError(f"the backend's reply cannot be parsed: {exc}")
            self.close()
            self._wake()

    # -- httptools callbacks ------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self.reason = status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # informational: the real reply follows
            self.interim = True
            self.headers = []
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        if self.head is not None and not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.complete = True
        self._wake()

    def _wake(self) -> None:
        if self.head is not None and not self.head.done():
            if self.error is not None:
                self.head.set_exception(self.error)
            else:
                self.head.set_result(None)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    # -- one exchange -------------------------------------------------------------------

    async def exchange(self, data: bytes, timeout: float | None) -> None:
        """Send a request; return once the reply's status line and headers are in."""
        assert self.transport is not None
        self._reset()
        self.active = True
        self.head = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        try:
            async with asyncio.timeout(timeout):
                await self.head
        except TimeoutError as exc:
            raise httpx.ReadTimeout("the backend did not answer in time") from exc

    async def body(self, timeout: float | None) -> AsyncIterator[bytes]:
        """The reply's body: what has arrived, as soon as it has."""
        while True:
            if self.chunks:
                data = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
                self.chunks.clear()
                self.buffered = 0
                if self.paused and self.transport is not None:
                    self.paused = False
                    self.transport.resume_reading()
                yield data
            elif self.complete:
                return
            elif self.error is not None:
                raise self.error
            else:
                await self._wait(timeout)

    async def _wait(self, timeout: float | None) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await self.waiter
        except TimeoutError as exc:
            raise httpx.ReadTimeout("the backend sent nothing within the read timeout") from exc
        finally:
            self.waiter = None

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and self.error is None and not self.closed

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _ReplyBody(httpx.AsyncByteStream):
    """A reply's body as httpx reads it; closing it hands the connection back."""

    def __init__(self, pool: UpstreamTransport, conn: _Connection, timeout: float | None
                 ) -> None:
        self.pool = pool
        self.conn = conn
        self.timeout = timeout
        self.released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.conn.body(self.timeout):
            yield chunk

    async def aclose(self) -> None:
        if not self.released:
            self.released = True
            self.pool.release(self.conn)


class UpstreamTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 keep-alive connections to a few backends, pooled per host."""

    def __init__(self, *, max_idle: int = 256, keepalive_expiry: float = 5.0,
                 verify: ssl.SSLContext | bool = True) -> None:
        self.max_idle = max_idle
        self.keepalive_expiry = keepalive_expiry
        self.verify = verify
        self._ssl: ssl.SSLContext | None = None
        self._idle: dict[Key, deque[_Connection]] = {}
        self._busy: set[_Connection] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"cannot send {url.scheme}:// requests upstream")
        key = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        read_timeout = timeouts.get("read")
        data = _serialise(request, await request.aread())
        conn = self._take(key)
        if conn is None:
            conn = await self._connect(key, timeouts.get("connect"))
        while True:
            self._busy.add(conn)
            try:
                await conn.exchange(data, read_timeout)
            except httpx.RemoteProtocolError:
                self._discard(conn)
                if conn.reused and not conn.received:
                    # An idle connection the backend had closed: once more, on a new one.
                    conn = await self._connect(key, timeouts.get("connect"))
                    continue
                raise
            except BaseException:
                self._discard(conn)  # closing it tells the backend to stop
                raise
            break
        if request.method == "HEAD":
            conn.complete, conn.keep_alive = True, False
        return httpx.Response(conn.status, headers=conn.headers,
                              stream=_ReplyBody(self, conn, read_timeout),
                              extensions={"http_version": b"HTTP/1.1",
                                          "reason_phrase": conn.reason})

    def _take(self, key: Key) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        stale = time.monotonic() - self.keepalive_expiry
        while idle and (idle[0].closed or idle[0].idle_since < stale):
            idle.popleft().close()  # the oldest first: those the backend may have dropped
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be dropped
            if not conn.closed:
                return conn
        return None

    async def _connect(self, key: Key, timeout: float | None) -> _Connection:
        scheme, host, port = key
        context = self._ssl_context() if scheme == "https" else None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(key), host, port, ssl=context,
                    server_hostname=host if context is not None else None)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from exc
        except OSError as exc:  # refused, unreachable, no such host, TLS failure
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        return conn

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            if isinstance(self.verify, ssl.SSLContext):
                self._ssl = self.verify
            else:
                self._ssl = ssl.create_default_context()
                if not self.verify:
                    self._ssl.check_hostname = False
                    self._ssl.verify_mode = ssl.CERT_NONE
        return self._ssl

    def release(self, conn: _Connection) -> None:
        """A reply was closed: keep its connection for the next request if the reply was
        read to its end and the backend keeps it open; close it otherwise."""
        self._busy.discard(conn)
        conn.active = False
        idle = self._idle.setdefault(conn.key, deque())
        if conn.reusable() and len(idle) < self.max_idle:
            if conn.paused and conn.transport is not None:
                conn.paused = False
                conn.transport.resume_reading()
            conn.reused = True
            conn.idle_since = time.monotonic()
            idle.append(conn)
        else:
            conn.close()

    def _discard(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        conn.active = False
        conn.close()

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        for conn in list(self._busy):
            conn.close()
        self._busy.clear()


class UpstreamClient(httpx.AsyncClient):
    """The httpx client for one backend, with a direct path for relayed requests.

    `send_direct` hands a request straight to the transport, skipping the client's layers
    (~65 µs a request): no cookie jar (a backend's cookies must never reach other agents
    anyway), no auth, redirects or event hooks, no default headers; the timeouts are the
    client's. Health checks, adapter loading and passthrough use the ordinary client API.
    """

    def __init__(self, *, base_url: str, transport: httpx.AsyncBaseTransport,
                 timeout: httpx.Timeout) -> None:
        super().__init__(base_url=base_url, transport=transport, timeout=timeout)
        self.direct = transport
        self._timeouts = timeout.as_dict()

    def direct_request(self, method: str, url: httpx.URL, content: bytes,
                       headers: list[tuple[bytes, bytes]]) -> httpx.Request:
        return httpx.Request(method, url, content=content, headers=headers,
                             extensions={"timeout": self._timeouts})

    async def send_direct(self, request: httpx.Request) -> httpx.Response:
        """The reply, streaming: read it (or not), then close it."""
        response = await self.direct.handle_async_request(request)
        response.request = request
        return response


def _serialise(request: httpx.Request, body: bytes) -> bytes:
    """The request's bytes: head and body in one buffer, the body framed by its length."""
    lines = [b"".join((name, b": ", value, b"\r\n")) for name, value in request.headers.raw
             if name.lower() not in _FRAMING]
    if body or request.method not in _BODYLESS:
        lines.append(b"content-length: %d\r\n" % len(body))
    block = b"".join(lines)
    if block.count(b"\n") != len(lines) or block.count(b"\r") != len(lines):
        raise httpx.LocalProtocolError("a request header contains a line break")
    target = request.url.raw_path
    if b" " in target or b"\r" in target or b"\n" in target:
        raise httpx.LocalProtocolError("the request target contains whitespace")
    return b"".join((request.method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n", block,
                     b"\r\n", body))
