"""The proxy benchmark: one command, one interleaved session, one markdown table.

load generator (core 1) -> direct | nextstate proxy | LiteLLM proxy (core 0) ->
fake upstream (core 0). Every target is measured in every scenario (whole and
streaming replies at each concurrency) once per round, in the order A, B, C, then
C, B, A, so that drifting load on the machine falls on all of them alike. For each run
it records throughput, latency percentiles, time to first byte and to first content,
failures, the server's CPU time per request (from ``/proc``, recording included: the
run ends only once the proxy's recorder has stored its backlog) and its peak RSS. A
soak run at the highest concurrency checks that memory stays flat and the recorder
keeps up.

    python -m bench.proxy_bench            # the full session (about 8 minutes)
    python -m bench.proxy_bench --quick    # one short round, for development
    python -m bench.proxy_bench --vllm     # also end to end against vLLM, and a publish
    python -m bench.proxy_bench --memory 1000   # also the proxy serving lessons from memory

Results go to ``bench/results/proxy.md`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from bench.fake_upstream import PIECES, run
from bench.loadgen import LoadResult, LoadSpec, Request, percentile, run_load
from bench.report import (
    BEFORE,
    DIRECT,
    LITELLM,
    MEMORY,
    NEXTSTATE,
    Run,
    before_after_table,
    checks,
    checks_table,
    ratio_table,
    scenario_table,
)
from bench.servers import (
    API_KEY,
    MODEL,
    Server,
    start_fake_upstream,
    start_litellm,
    start_nextstate,
)
from nextstate.core.vllm_server import free_port

RESULTS = Path(__file__).resolve().parent / "results"
SERVER_CORE, LOAD_CORE = 0, 1
MEMORY_LESSONS = 3  # lessons a request gets at most (MemorySettings.lessons)
_WORDS = ["the", "agent", "reads", "the", "file", "then", "runs", "the", "tests", "and",
          "reports", "which", "failed", "and", "why", "it", "thinks", "so", "before",
          "proposing", "a", "patch"]


def _text(words: int, seed: int) -> str:
    return " ".join(_WORDS[(i * 7 + seed) % len(_WORDS)] for i in range(words))


def conversation() -> list[dict[str, Any]]:
    """About 500 tokens: a system prompt, a question, the upstream's own reply, a follow-up.

    The reply is exactly what the fake upstream answers to the first two messages, so the
    proxy's store pairs every benchmark request with the seeded first turn, as it would
    a real conversation."""
    return [{"role": "system", "content": _text(110, 1)},
            {"role": "user", "content": _text(150, 2)},
            {"role": "assistant", "content": "".join(PIECES)},
            {"role": "user", "content": _text(120, 3)}]


def body(stream: bool, messages: list[dict[str, Any]] | None = None,
         model: str = MODEL, max_tokens: int = 32) -> dict[str, Any]:
    return {"model": model, "messages": messages or conversation(),
            "max_tokens": max_tokens, "temperature": 0, "stream": stream}


class Target:
    """Where the load generator sends requests, and whose CPU is measured."""

    def __init__(self, name: str, port: int, server: Server, upstream: Server) -> None:
        self.name, self.port, self.server, self.upstream = name, port, server, upstream

    def request(self, payload: dict[str, Any]) -> Request:
        return Request("127.0.0.1", self.port, "/v1/chat/completions", payload, API_KEY)


async def _backlog(client: httpx.AsyncClient, url: str) -> int:
    """Records submitted to nextstate's recorder and not yet in the store: queued, being
    written, waiting for their earlier turn, or spooled to disk."""
    answer = (await client.get(url + "/health")).json()["recorder"]
    return int(answer["submitted"] - answer["written"] - answer["dropped"]
               - answer.get("rejected", 0))


async def _drain(client: httpx.AsyncClient, url: str, timeout: float = 30.0) -> float:
    start = time.perf_counter()
    while await _backlog(client, url) > 0 and time.perf_counter() - start < timeout:
        await asyncio.sleep(0.05)
    return time.perf_counter() - start


async def measure(target: Target, stream: bool, conc: int, rnd: int, args: argparse.Namespace,
                  ) -> Run:
    payload = body(stream)
    await run_load(target.request(payload), LoadSpec(conc, args.warmup))
    nextstate = target.name in (NEXTSTATE, BEFORE, MEMORY)
    async with httpx.AsyncClient(timeout=10) as client:
        if nextstate:
            await _drain(client, target.server.url)
        target.server.reset_peak_rss()
        cpu0, up0 = target.server.cpu_seconds(), target.upstream.cpu_seconds()
        peak: list[int] = []

        async def sample() -> None:  # the recorder's backlog, twice a second
            while True:
                await asyncio.sleep(0.5)
                peak.append(await _backlog(client, target.server.url))

        sampler = asyncio.create_task(sample()) if nextstate else None
        result = await run_load(target.request(payload), LoadSpec(conc, args.duration))
        if sampler is not None:
            sampler.cancel()
        drain = await _drain(client, target.server.url) if nextstate else None
    cpu = target.server.cpu_seconds() - cpu0
    up = target.upstream.cpu_seconds() - up0
    return _run(target.name, stream, conc, rnd, result, cpu, up,
                target.server.peak_rss_mb(), max(peak, default=0) if nextstate else None,
                drain)


def _run(name: str, stream: bool, conc: int, rnd: int, result: LoadResult, cpu: float,
         up: float, peak_rss: float, backlog: int | None, drain: float | None) -> Run:
    ms = 1000.0
    per = ms / result.ok if result.ok else float("nan")
    return Run(target=name, stream=stream, concurrency=conc, round=rnd, ok=result.ok,
               failed=result.failed, rps=result.rps,
               p50=percentile(result.latency, 50) * ms, p90=percentile(result.latency, 90) * ms,
               p99=percentile(result.latency, 99) * ms,
               ttfb_p50=percentile(result.ttfb, 50) * ms,
               ttfc_p50=percentile(result.ttfc, 50) * ms if stream else float("nan"),
               cpu_ms=cpu * per, upstream_cpu_ms=up * per, peak_rss_mb=peak_rss,
               backlog_max=backlog, drain_s=drain, errors=dict(result.errors))


async def soak(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """Load at the highest concurrency for a while: RSS and backlog once a second."""
    conc = max(args.concurrency)
    rss: list[float] = []
    backlog: list[int] = []
    async with httpx.AsyncClient(timeout=10) as client:
        async def sample() -> None:
            while True:
                rss.append(target.server.rss_mb())
                backlog.append(await _backlog(client, target.server.url))
                await asyncio.sleep(1.0)

        sampler = asyncio.create_task(sample())
        result = await run_load(target.request(body(False)), LoadSpec(conc, args.soak))
        sampler.cancel()
        await _drain(client, target.server.url)
    half = len(rss) // 2
    return {"seconds": args.soak, "concurrency": conc, "requests": result.ok,
            "failed": result.failed, "rss_start_mb": rss[0], "rss_end_mb": rss[-1],
            "rss_growth_mb": rss[-1] - rss[half] if rss else 0.0,
            "backlog_max": max(backlog, default=0), "rps": result.rps}


async def seed(targets: list[Target]) -> None:
    """The conversation's first turn, through every target (nextstate records it)."""
    first = conversation()[:2]
    async with httpx.AsyncClient(timeout=30,
                                 headers={"authorization": f"Bearer {API_KEY}"}) as client:
        for t in targets:
            answer = await client.post(f"http://127.0.0.1:{t.port}/v1/chat/completions",
                                       json=body(False, first))
            answer.raise_for_status()
            assert answer.json()["choices"][0]["message"]["content"] == "".join(PIECES)


async def session(targets: list[Target], args: argparse.Namespace,
                  ) -> tuple[list[Run], dict[str, Any] | None]:
    await seed(targets)
    runs: list[Run] = []
    scenarios = [(s, c) for s in (False, True) for c in args.concurrency]
    for rnd in range(args.rounds):
        for stream, conc in scenarios:
            block = len(runs) // len(targets)  # A, B, C, then C, B, A, ...
            order = targets if block % 2 == 0 else targets[::-1]
            for target in order:
                run_ = await measure(target, stream, conc, rnd, args)
                runs.append(run_)
                print(f"round {rnd} {'stream' if stream else 'whole'} c={conc:<3} "
                      f"{target.name:<10} {run_.rps:7.0f} req/s  p50 {run_.p50:7.2f} ms  "
                      f"cpu {run_.cpu_ms:6.2f} ms/req  rss {run_.peak_rss_mb:5.0f} MB  "
                      f"failed {run_.failed}", flush=True)
    ns = next((t for t in targets if t.name == NEXTSTATE), None)
    soaked = await soak(ns, args) if ns is not None and args.soak > 0 else None
    return runs, soaked


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    load = os.getloadavg()
    return (f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}, Python "
            f"{platform.python_version()}; load average at start {load[0]:.2f}")


def render(runs: list[Run], soaked: dict[str, Any] | None, args: argparse.Namespace,
           about: str) -> str:
    return "\n\n".join(filter(None, [
        f"# Proxy benchmark, {dt.date.today().isoformat()}",
        f"Machine: {about}. Servers pinned to core {SERVER_CORE}, load generator to core "
        f"{LOAD_CORE}. {args.rounds} interleaved round(s), {args.duration:g} s per run after "
        f"{args.warmup:g} s warm-up; a ~500-token conversation, 32 completion tokens "
        "(streams: 32 content chunks). Medians over rounds; CPU is the server's own "
        "(direct: the fake upstream's), recording included.",
        "## Targets", checks_table(checks(runs, soaked)),
        "## Added cost and ratios", ratio_table(runs),
        "## All runs (medians)", scenario_table(runs),
        "## Before and after (same session)" if any(r.target == BEFORE for r in runs) else "",
        before_after_table(runs),
        "## Without and with the memory (same session)"
        if any(r.target == MEMORY for r in runs) else "",
        before_after_table(runs, NEXTSTATE, MEMORY), memory_note(runs, args)]))


def memory_note(runs: list[Run], args: argparse.Namespace) -> str:
    if not any(r.target == MEMORY for r in runs):
        return ""
    return (f"With the memory: {args.memory} lessons in the store, {args.memory // 20} of "
            f"them in the requests' own scope; each request is matched against those "
            f"(BM25) and gets the best {MEMORY_LESSONS} appended to its last user message "
            "(recorded with the turn).")


def seed_lessons(store_url: str, count: int, shared: int | None = None) -> None:
    """``count`` lessons: ``shared`` of them (default: one in 20) shared, the scope of the
    benchmark's requests (they name no tenant nor user), worded from the conversation's
    own words so that every one matches; the rest for other tenants' users (never scored
    for these requests)."""
    from nextstate.core.store import Store

    shared = count // 20 if shared is None else shared
    every = max(1, count // shared) if shared else count + 1
    store = Store(store_url)
    try:
        for i in range(count):
            if i % every == 0 and i // every < shared:
                store.lessons.add(f"Lesson {i}: {_text(12, i)}", pinned=False)
            else:
                store.lessons.add(f"Lesson {i}: {_text(12, i)}", tenant=f"t{i % 50}",
                                  user=f"t{i % 50}:u{i}", pinned=False)
    finally:
        store.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="nextstate proxy vs direct vs LiteLLM")
    parser.add_argument("--quick", action="store_true", help="one short round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 8, 32])
    parser.add_argument("--soak", type=float, default=60.0, help="seconds; 0 to skip")
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a folder with a copy of nextstate/proxy taken before a change: "
                             f"measured too, as '{BEFORE}'")
    parser.add_argument("--vllm", action="store_true",
                        help="also end to end against vLLM with the toy model, and a publish")
    parser.add_argument("--vllm-only", action="store_true", help="only the vLLM part")
    parser.add_argument("--memory", type=int, default=0, metavar="N",
                        help=f"also measure the proxy with its memory on, N lessons in its "
                             f"store, as '{MEMORY}'")
    parser.add_argument("--out", type=Path, default=RESULTS / "proxy.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup, args.soak = 1, 2.0, 0.5, 10.0
    return args


def fake_session(work: Path, args: argparse.Namespace,
                 ) -> tuple[list[Run], dict[str, Any] | None]:
    """Start the fake upstream and every target on it; run the interleaved session."""
    servers: list[Server] = []
    try:
        upstream = start_fake_upstream(free_port(), SERVER_CORE, work)
        servers.append(upstream)
        targets = [Target(DIRECT, int(upstream.url.rsplit(":", 1)[1]), upstream, upstream)]
        wanted: list[tuple[str, dict[str, Any]]] = [(NEXTSTATE, {})]
        if args.baseline is not None:
            wanted.append((BEFORE, {"name": BEFORE, "source": args.baseline}))
        if args.memory:
            (work / MEMORY).mkdir(parents=True, exist_ok=True)
            seed_lessons(f"sqlite:///{work / MEMORY / 'store.db'}", args.memory)
            # Every matched request served its lessons (no control share): the full cost.
            wanted.append((MEMORY, {"name": MEMORY,
                                    "extra": ("--memory", "--memory-control", "0")}))
        for name, options in wanted:
            port = free_port()
            servers.append(start_nextstate(upstream.url, port, SERVER_CORE, work, **options))
            targets.append(Target(name, port, servers[-1], upstream))
        if not args.no_litellm:
            port = free_port()
            servers.append(start_litellm(upstream.url, port, SERVER_CORE, work))
            targets.append(Target(LITELLM, port, servers[-1], upstream))
        return run(session(targets, args))
    finally:
        for server in reversed(servers):
            server.stop()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    about = machine()
    os.sched_setaffinity(0, {LOAD_CORE})
    work = Path(tempfile.mkdtemp(prefix="nextstate-bench-"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = ""
    if not args.vllm_only:
        runs, soaked = fake_session(work, args)
        report = render(runs, soaked, args, about)
        args.out.write_text(report + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(
            {"machine": about, "runs": [asdict(r) for r in runs], "soak": soaked}, indent=1))
    if args.vllm or args.vllm_only:
        from bench.vllm_bench import end_to_end

        try:
            extra = end_to_end(work, args)
        except Exception as exc:  # keep what was measured; say what failed
            extra = f"## End to end: vLLM\n\nDid not complete: {type(exc).__name__}: {exc}"
        report = "\n\n".join(filter(None, [
            report or f"# Proxy benchmark, {dt.date.today().isoformat()}\n\nMachine: {about}.",
            extra]))
        args.out.write_text(report + "\n")
    print(report)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
