"""The upstream transport (proxy -> vLLM) against a real asyncio server on loopback:
keep-alive reuse, streaming as bytes arrive, early close, timeouts, errors; and through
the proxy, a client that leaves mid-stream closes the upstream connection."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import orjson
import pytest

from nextstate.core.vllm_server import free_port
from nextstate.proxy.server import BackgroundProxy
from nextstate.proxy.settings import ProxySettings
from nextstate.proxy.transport import HIGH_WATER, UpstreamClient, UpstreamTransport

Handler = Callable[["Exchange"], Awaitable[bool]]  # returns: keep the connection open


class Exchange:
    """One request as the server read it, and the writer to answer it."""

    def __init__(self, head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
        self.head, self.body, self.writer = head, body, writer
        self.method, self.target = head.split(b" ", 2)[:2]

    async def reply(self, status: int = 200, body: bytes = b"ok",
                    headers: tuple[tuple[str, str], ...] = ()) -> None:
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
        self.writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
                          .encode() + body)
        await self.writer.drain()

    async def chunk(self, data: bytes) -> None:
        self.writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        await self.writer.drain()


class Upstream:
    """A loopback HTTP/1.1 server answering every request with ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[Exchange] = []
        self.closed_by_client = asyncio.Event()
        self.port = 0
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                exchange = Exchange(head, await reader.readexactly(length), writer)
                self.requests.append(exchange)
                if not await self.handler(exchange):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client.set()
        finally:
            writer.close()

    async def __aenter__(self) -> Upstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


async def ok(exchange: Exchange) -> bool:
    await exchange.reply(body=b"echo:" + exchange.body)
    return True


@contextlib.asynccontextmanager
async def client_for(upstream: Upstream, **timeouts: float) -> AsyncIterator[httpx.AsyncClient]:
    transport = UpstreamTransport(keepalive_expiry=timeouts.pop("keepalive_expiry", 5.0))
    async with httpx.AsyncClient(base_url=upstream.url, transport=transport,
                                 timeout=httpx.Timeout(5.0, **timeouts)) as client:
        yield client


async def test_replies_come_back_and_the_connection_is_reused():
    async with Upstream(ok) as upstream, client_for(upstream) as client:
        for i in range(3):
            answer = await client.post("/v1/x?q=1", content=b"body%d" % i,
                                       headers={"x-h": "v"})
            assert answer.status_code == 200 and answer.content == b"echo:body%d" % i
        assert upstream.connections == 1
        first = upstream.requests[0]
        assert (first.method, first.target) == (b"POST", b"/v1/x?q=1")
        assert b"x-h: v" in first.head and b"content-length: 5" in first.head.lower()


async def test_upstream_errors_pass_through_untouched():
    async def refuse(exchange: Exchange) -> bool:
        await exchange.reply(400, b'{"error": {"message": "bad"}}',
                             (("content-type", "application/json"), ("x-vllm", "1")))
        return True

    async with Upstream(refuse) as upstream, client_for(upstream) as client:
        answer = await client.post("/v1/chat/completions", content=b"{}")
    assert answer.status_code == 400
    assert answer.content == b'{"error": {"message": "bad"}}'
    assert answer.headers["x-vllm"] == "1" and answer.headers["content-type"] == "application/json"


async def test_a_stream_is_handed_on_as_it_arrives():
    release = asyncio.Event()

    async def stream(exchange: Exchange) -> bool:
        exchange.writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n"
                              b"content-type: text/event-stream\r\n\r\n")
        await exchange.chunk(b"data: 1\n\n")
        await release.wait()
        await exchange.chunk(b"data: 2\n\n")
        exchange.writer.write(b"0\r\n\r\n")
        return True

    async with Upstream(stream) as upstream, client_for(upstream) as client:
        async with client.stream("POST", "/s", content=b"{}") as answer:
            pieces = answer.aiter_bytes()
            assert await asyncio.wait_for(anext(pieces), 2) == b"data: 1\n\n"
            release.set()
            assert b"".join([p async for p in pieces]) == b"data: 2\n\n"
        assert (await client.get("/again")).status_code == 200
        assert upstream.connections == 1  # the finished stream's connection was reused


async def test_closing_a_reply_early_closes_its_connection():
    async def endless(exchange: Exchange) -> bool:
        exchange.writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while True:
            await exchange.chunk(b"data: more\n\n")
            await asyncio.sleep(0.01)

    async with Upstream(endless) as upstream, client_for(upstream) as client:
        async with client.stream("POST", "/s", content=b"{}") as answer:
            await anext(answer.aiter_bytes())
        await asyncio.wait_for(upstream.closed_by_client.wait(), 2)  # vLLM would abort


async def test_a_large_reply_is_read_whole_through_paused_reading():
    big = bytes(range(256)) * (3 * HIGH_WATER // 256)

    async def large(exchange: Exchange) -> bool:
        await exchange.reply(body=big)
        return True

    async with Upstream(large) as upstream, client_for(upstream) as client:
        async with client.stream("GET", "/big") as answer:
            await asyncio.sleep(0.1)  # let the reply pile up before reading it
            assert await answer.aread() == big
        assert (await client.get("/big")).content == big
        assert upstream.connections == 1


async def test_an_idle_connection_the_backend_closed_is_replaced():
    async def once(exchange: Exchange) -> bool:
        await exchange.reply()
        return False  # closes the keep-alive connection after answering

    async with Upstream(once) as upstream, client_for(upstream) as client:
        for _ in range(3):
            assert (await client.get("/")).status_code == 200
            await asyncio.sleep(0.05)
        assert upstream.connections == 3


async def test_a_stale_connection_is_retried_once_on_a_new_one():
    async def silent_close(exchange: Exchange) -> bool:
        if upstream.connections == 1 and len(upstream.requests) == 2:
            return False  # the second request on the first connection: hang up unanswered
        await exchange.reply()
        return True

    async with Upstream(silent_close) as upstream, client_for(upstream) as client:
        assert (await client.get("/")).status_code == 200
        assert (await client.get("/")).status_code == 200
        assert upstream.connections == 2 and len(upstream.requests) == 3


async def test_idle_connections_expire():
    async with Upstream(ok) as upstream, client_for(upstream, keepalive_expiry=0.05) as client:
        await client.get("/")
        await asyncio.sleep(0.1)
        await client.get("/")
        assert upstream.connections == 2


async def test_a_reply_ended_by_closing_the_connection_is_read_whole():
    async def close_delimited(exchange: Exchange) -> bool:
        exchange.writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await exchange.writer.drain()
        return False

    async with Upstream(close_delimited) as upstream, client_for(upstream) as client:
        assert (await client.get("/")).content == b"all of it"


async def test_a_backend_that_dies_mid_reply_is_a_protocol_error():
    async def dies(exchange: Exchange) -> bool:
        exchange.writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await exchange.writer.drain()
        return False

    async with Upstream(dies) as upstream, client_for(upstream) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get("/")


async def test_no_backend_is_a_connect_error():
    async with httpx.AsyncClient(transport=UpstreamTransport()) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{free_port()}/health")


async def test_a_silent_backend_is_a_read_timeout():
    async def never(exchange: Exchange) -> bool:
        await asyncio.sleep(10)
        return False

    async with Upstream(never) as upstream, client_for(upstream, read=0.1) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/")


async def test_a_header_with_a_line_break_is_refused():
    async with Upstream(ok) as upstream, client_for(upstream) as client:
        with pytest.raises(httpx.LocalProtocolError):
            await client.get("/", headers={"x-evil": "a\r\nx-injected: 1"})
        assert not upstream.requests


async def test_a_client_leaving_mid_stream_closes_the_upstream_connection(tmp_path):
    async def endless(exchange: Exchange) -> bool:
        exchange.writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n"
                              b"content-type: text/event-stream\r\n\r\n")
        chunk = {"id": "c", "model": "toy", "choices": [
            {"index": 0, "delta": {"content": "x"}, "token_ids": [1], "finish_reason": None}]}
        while True:
            await exchange.chunk(b"data: " + orjson.dumps(chunk) + b"\n\n")
            await asyncio.sleep(0.01)

    async with Upstream(endless) as upstream:
        settings = ProxySettings(backends=(upstream.url,), store_url=f"sqlite:///{tmp_path}/s.db",
                                 spool_dir=tmp_path / "spool")
        proxy = await asyncio.to_thread(BackgroundProxy(settings, free_port()).start)
        try:
            async with httpx.AsyncClient(base_url=proxy.base_url, timeout=5) as client:
                body = {"model": "toy", "stream": True,
                        "messages": [{"role": "user", "content": "hi"}]}
                async with client.stream("POST", "/chat/completions", json=body) as answer:
                    assert answer.status_code == 200
                    await anext(answer.aiter_bytes())
            await asyncio.wait_for(upstream.closed_by_client.wait(), 5)
        finally:
            await asyncio.to_thread(proxy.stop)


async def test_the_direct_path_keeps_timeouts_and_never_sends_a_backends_cookies():
    async def cookie_then_silence(exchange: Exchange) -> bool:
        if len(upstream.requests) == 1:
            await exchange.reply(headers=(("set-cookie", "id=abc"),))
            return True
        await asyncio.sleep(10)
        return False

    async with Upstream(cookie_then_silence) as upstream:
        client = UpstreamClient(base_url=upstream.url, transport=UpstreamTransport(),
                                timeout=httpx.Timeout(5.0, read=0.2))
        async with client:
            url = client.build_request("POST", "/v1/x").url
            answer = await client.send_direct(client.direct_request("POST", url, b"{}", []))
            assert answer.status_code == 200 and await answer.aread() == b"ok"
            with pytest.raises(httpx.ReadTimeout):
                await client.send_direct(client.direct_request("POST", url, b"{}", []))
        assert b"cookie" not in upstream.requests[1].head.lower()


async def test_a_backend_that_drops_syns_is_a_connect_timeout():
    """What the relay fails over on: nothing was sent (tests/proxy/test_backends.py)."""
    from tests.proxy.upstream import black_hole

    with black_hole() as url:
        transport = UpstreamTransport()
        client = httpx.AsyncClient(transport=transport,
                                   timeout=httpx.Timeout(5.0, connect=0.3))
        with pytest.raises(httpx.ConnectTimeout):
            await client.get(f"{url}/v1/models")
        await client.aclose()
