"""The load generator: a fixed number of keep-alive connections, each sending one request
after another, bounded in count and in time, to a loopback address only.

**load generator** -> (proxy ->) upstream. A raw asyncio HTTP/1.1 client (httptools
parses the replies) so that the client itself costs little and measures precisely: per
request it records the latency (request written -> reply complete), the time to the
first byte of the reply (its status line) and, for streams, the time to the first event
carrying content (a non-empty ``content`` or ``text``). A request fails on a non-200
status, a broken or timed-out connection, or a stream that does not end with
``data: [DONE]``; failures are counted by kind, never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, cast

import httptools
import orjson

LOOPBACK = ("127.0.0.1", "localhost", "::1")
_CONTENT = re.compile(rb'"(?:content|text)":\s?"[^"]')
_DONE = b"data: [DONE]"


@dataclass(frozen=True)
class LoadSpec:
    concurrency: int
    duration_s: float  # stop starting requests after this long
    max_requests: int = 1_000_000  # and after this many
    timeout_s: float = 30.0  # one request's limit


@dataclass(frozen=True)
class Request:
    """A prepared request: the same bytes sent every time."""

    host: str
    port: int
    path: str
    body: dict[str, Any]
    api_key: str = "unused"

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    def raw(self) -> bytes:
        if self.host not in LOOPBACK:
            raise ValueError(f"the load generator only targets loopback, not {self.host}")
        payload = orjson.dumps(self.body)
        head = (f"POST {self.path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
                "content-type: application/json\r\naccept: */*\r\n"
                f"authorization: Bearer {self.api_key}\r\n"
                f"content-length: {len(payload)}\r\n\r\n")
        return head.encode() + payload


@dataclass
class LoadResult:
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0
    latency: list[float] = field(default_factory=list)  # seconds, successful requests
    ttfb: list[float] = field(default_factory=list)
    ttfc: list[float] = field(default_factory=list)  # streams only

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    @property
    def rps(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s else 0.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class RequestFailed(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class _Connection(asyncio.Protocol):
    """One keep-alive connection; `exchange` sends a request and times its reply."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] | None = None
        self.status = 0
        self.keep_alive = True
        self.first_byte = 0.0
        self.first_content = 0.0
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.done is not None and not self.done.done():
            self.done.set_exception(RequestFailed("connection closed"))

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if not self.first_byte:
            self.first_byte = now
        if not self.first_content and _CONTENT.search(data):
            self.first_content = now
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.done is not None and not self.done.done():
                self.done.set_exception(RequestFailed("unparseable reply"))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.tail = (self.tail + body)[-64:]

    def on_message_complete(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    async def exchange(self, raw: bytes, stream: bool, timeout: float,
                       ) -> tuple[float, float, float]:
        """(latency, ttfb, ttfc) in seconds; raises RequestFailed."""
        if self.transport is None or self.transport.is_closing():
            raise RequestFailed("connection closed")
        self.done = asyncio.get_running_loop().create_future()
        self.status, self.first_byte, self.first_content, self.tail = 0, 0.0, 0.0, b""
        start = time.perf_counter()
        self.transport.write(raw)
        try:
            await asyncio.wait_for(self.done, timeout)
        except TimeoutError as exc:
            self.close()
            raise RequestFailed("timeout") from exc
        end = time.perf_counter()
        if self.status != 200:
            raise RequestFailed(f"http {self.status}")
        if stream and _DONE not in self.tail:
            raise RequestFailed("stream without [DONE]")
        if not self.keep_alive:
            self.close()
        ttfc = (self.first_content or end) - start
        return end - start, self.first_byte - start, ttfc

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None


async def _connect(host: str, port: int) -> _Connection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(_Connection, host, port)
    return conn


class _Budget:
    """Shared count and time bound for all workers."""

    def __init__(self, spec: LoadSpec) -> None:
        self.left = spec.max_requests
        self.deadline = time.perf_counter() + spec.duration_s

    def take(self) -> bool:
        if self.left <= 0 or time.perf_counter() >= self.deadline:
            return False
        self.left -= 1
        return True


async def _worker(conn: _Connection | None, request: Request, raw: bytes, spec: LoadSpec,
                  budget: _Budget, result: LoadResult) -> None:
    while budget.take():
        try:
            if conn is None or conn.transport is None:
                conn = await asyncio.wait_for(_connect(request.host, request.port),
                                              spec.timeout_s)
            latency, ttfb, ttfc = await conn.exchange(raw, request.stream, spec.timeout_s)
        except RequestFailed as exc:
            result.errors[exc.kind] += 1
            if conn is None or conn.transport is None:  # closed: reconnect, do not spin
                conn = None
                await asyncio.sleep(0.05)
            continue
        except (OSError, TimeoutError) as exc:
            result.errors[f"connect: {type(exc).__name__}"] += 1
            conn = None
            await asyncio.sleep(0.05)  # the server is away: do not spin
            continue
        result.ok += 1
        result.latency.append(latency)
        result.ttfb.append(ttfb)
        if request.stream:
            result.ttfc.append(ttfc)
    if conn is not None:
        conn.close()


async def run_load(request: Request, spec: LoadSpec) -> LoadResult:
    """Open ``spec.concurrency`` connections, then drive them until the budget is spent."""
    raw = request.raw()
    result = LoadResult()
    conns: list[_Connection | None] = []
    for _ in range(spec.concurrency):
        try:
            conns.append(await asyncio.wait_for(_connect(request.host, request.port),
                                                spec.timeout_s))
        except (OSError, TimeoutError) as exc:
            result.errors[f"connect: {type(exc).__name__}"] += 1
            conns.append(None)
    budget = _Budget(spec)
    start = time.perf_counter()
    workers = [_worker(c, request, raw, spec, budget, result) for c in conns]
    await asyncio.wait_for(asyncio.gather(*workers), spec.duration_s + spec.timeout_s + 5)
    result.elapsed_s = time.perf_counter() - start
    return result
