"""The proxy benchmark's own parts: the fake upstream answers like vLLM, the load
generator measures it without failures, the report pairs rounds correctly."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from bench.fake_upstream import COMPLETION_TOKENS, PIECES, serve
from bench.loadgen import LoadSpec, Request, percentile, run_load
from bench.proxy_bench import body
from bench.report import DIRECT, NEXTSTATE, Run, checks, ratio_table
from nextstate.core.vllm_server import free_port


async def _with_upstream(check):  # type: ignore[no-untyped-def]
    port = free_port()
    ready = asyncio.Event()
    server = asyncio.ensure_future(serve(port, ready=ready))
    await asyncio.wait_for(ready.wait(), 5)
    try:
        return await check(port)
    finally:
        server.cancel()


@pytest.mark.parametrize("stream", [False, True])
async def test_load_generator_measures_the_fake_upstream_without_failures(stream):
    async def check(port):
        request = Request("127.0.0.1", port, "/v1/chat/completions", body(stream))
        return await run_load(request, LoadSpec(concurrency=4, duration_s=0.3))

    result = await _with_upstream(check)
    assert result.ok > 10 and result.failed == 0
    assert percentile(result.latency, 50) < 1.0
    assert bool(result.ttfc) is stream


async def test_fake_upstream_returns_token_ids_and_logprobs_only_when_asked():
    async def check(port):
        import httpx

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            plain = (await client.post("/v1/chat/completions", json=body(False))).json()
            asked = (await client.post("/v1/chat/completions", json={
                **body(False), "return_token_ids": True, "logprobs": True})).json()
            stream = (await client.post("/v1/chat/completions", json={
                **body(True), "stream_options": {"include_usage": True}})).content
        return plain, asked, stream

    plain, asked, stream = await _with_upstream(check)
    assert plain["choices"][0]["token_ids"] is None and plain["prompt_token_ids"] is None
    assert plain["choices"][0]["message"]["content"] == "".join(PIECES)
    assert len(asked["choices"][0]["token_ids"]) == COMPLETION_TOKENS
    assert len(asked["choices"][0]["logprobs"]["content"]) == COMPLETION_TOKENS
    events = [orjson.loads(e[6:]) for e in stream.split(b"\n\n")
              if e.startswith(b"data: {")]
    assert len(events) == COMPLETION_TOKENS + 2  # role chunk, content chunks, usage chunk
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 32
    assert stream.endswith(b"data: [DONE]\n\n")


def _run(target: str, rnd: int, p50: float, cpu: float) -> Run:
    return Run(target=target, stream=False, concurrency=1, round=rnd, ok=100, failed=0,
               rps=1000 / p50, p50=p50, p90=p50, p99=p50, ttfb_p50=p50, ttfc_p50=p50,
               cpu_ms=cpu, upstream_cpu_ms=0.0, peak_rss_mb=60.0)


def test_added_latency_is_paired_within_each_round():
    runs = [_run(DIRECT, 0, 1.0, 0.1), _run(NEXTSTATE, 0, 1.5, 0.8),
            _run(DIRECT, 1, 3.0, 0.1), _run(NEXTSTATE, 1, 3.7, 0.9),
            _run(DIRECT, 2, 2.0, 0.1), _run(NEXTSTATE, 2, 2.6, 0.7)]
    assert "| whole | 1 | 0.60 |" in ratio_table(runs)  # median of 0.5, 0.7, 0.6
    met = {c.goal.split(",")[0]: c.met for c in checks(runs, None)}
    assert met["added p50 latency"] is True and met["peak RSS under load ≤ 150 MB"] is True
