"""End to end against the real vLLM (CPU, the toy model), and an adapter publish under load.

load generator -> direct | nextstate proxy | LiteLLM proxy -> **vLLM**; then
load generator -> nextstate proxy (with a policy) -> vLLM while the learner
(store -> learner -> publish -> vLLM) trains and publishes adapters, counting failed
requests and the latency while it swaps them. Optional (``--vllm``): starting vLLM and
training take minutes. vLLM gets core 1 to itself; the proxies, the load generator and
the learner share core 0.

The learner runs in a child process (``python -m bench.vllm_bench learn ...``) so that
its training never shares the load generator's event loop or interpreter lock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from bench.fake_upstream import run
from bench.loadgen import LoadResult, LoadSpec, Request, percentile, run_load
from bench.report import DIRECT, LITELLM, NEXTSTATE, Run, ratio_table, scenario_table
from bench.servers import API_KEY, Server, start_litellm, start_nextstate
from nextstate.core.vllm_server import VLLMProcess, free_port, toy_model_config
from nextstate.experiment.converse import converse

TOY = "nextstate-toy"


def _body(stream: bool) -> dict[str, Any]:
    from bench.proxy_bench import body

    return body(stream, model=TOY)


async def _measure(targets: list[tuple[str, int, Server | None]], rounds: int,
                   duration: float) -> list[Run]:
    runs: list[Run] = []
    for rnd in range(rounds):
        for stream in (False, True):
            for conc in (1, 4):
                block = len(runs) // len(targets)
                order = targets if block % 2 == 0 else targets[::-1]
                for name, port, server in order:
                    request = Request("127.0.0.1", port, "/v1/chat/completions",
                                      _body(stream), API_KEY)
                    await run_load(request, LoadSpec(conc, 2.0, timeout_s=120))
                    cpu0 = server.cpu_seconds() if server else 0.0
                    result = await run_load(request, LoadSpec(conc, duration, timeout_s=120))
                    cpu = (server.cpu_seconds() - cpu0) if server else float("nan")
                    runs.append(_as_run(name, stream, conc, rnd, result, cpu, server))
                    print(f"vllm round {rnd} {'stream' if stream else 'whole'} c={conc} "
                          f"{name:<10} {result.rps:6.1f} req/s p50 "
                          f"{percentile(result.latency, 50) * 1000:7.1f} ms "
                          f"failed {result.failed}", flush=True)
    return runs


def _as_run(name: str, stream: bool, conc: int, rnd: int, result: LoadResult, cpu: float,
            server: Server | None) -> Run:
    ms = 1000.0
    return Run(target=name, stream=stream, concurrency=conc, round=rnd, ok=result.ok,
               failed=result.failed, rps=result.rps,
               p50=percentile(result.latency, 50) * ms,
               p90=percentile(result.latency, 90) * ms,
               p99=percentile(result.latency, 99) * ms,
               ttfb_p50=percentile(result.ttfb, 50) * ms,
               ttfc_p50=percentile(result.ttfc, 50) * ms if stream else float("nan"),
               cpu_ms=cpu * ms / result.ok if result.ok else float("nan"),
               upstream_cpu_ms=float("nan"),
               peak_rss_mb=server.peak_rss_mb() if server else float("nan"),
               errors=dict(result.errors))


async def _publish_under_load(proxy: Server, vllm_url: str, model: Path, work: Path,
                              ) -> dict[str, Any]:
    request = Request("127.0.0.1", int(proxy.url.rsplit(":", 1)[1]), "/v1/chat/completions",
                      {**_body(False), "max_tokens": 8}, API_KEY)
    streamed = replace(request, body={**request.body, "stream": True})
    calm = await asyncio.gather(run_load(request, LoadSpec(2, 10.0, timeout_s=120)),
                                run_load(streamed, LoadSpec(2, 10.0, timeout_s=120)))
    store = f"sqlite:///{work / 'publish' / proxy.name / 'store.db'}"  # the proxy's own
    learner = subprocess.Popen(
        [sys.executable, "-m", "bench.vllm_bench", "learn", "--store", store, "--backend",
         vllm_url, "--model-dir", str(model), "--adapters", str(work / "adapters")],
        stdout=open(work / "learner.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    started = time.monotonic()
    during: list[LoadResult] = []
    try:
        while learner.poll() is None and time.monotonic() - started < 900:
            during.extend(await asyncio.gather(
                run_load(request, LoadSpec(2, 5.0, timeout_s=120)),
                run_load(streamed, LoadSpec(2, 5.0, timeout_s=120))))
        during.extend(await asyncio.gather(  # and through the switch
            run_load(request, LoadSpec(2, 3.0, timeout_s=120)),
            run_load(streamed, LoadSpec(2, 3.0, timeout_s=120))))
    finally:
        if learner.poll() is None:
            learner.terminate()
        learner.wait(30)
    async with httpx.AsyncClient(timeout=10) as client:
        serving = (await client.get(proxy.url + "/v1/learner/status")).json().get("serving")

    def summary(results: list[LoadResult]) -> dict[str, Any]:
        latency = [x for r in results for x in r.latency]
        return {"requests": sum(r.ok for r in results),
                "failed": sum(r.failed for r in results),
                "p50_ms": percentile(latency, 50) * 1000,
                "p99_ms": percentile(latency, 99) * 1000}

    return {"before": summary(list(calm)), "during": summary(during),
            "seconds": time.monotonic() - started, "learner_exit": learner.returncode,
            "serving": serving}


def end_to_end(work: Path, args: argparse.Namespace) -> str:
    """Run both parts; returns the markdown section."""
    from nextstate.core.paths import data_dir
    from nextstate.learner.toy_model import ensure_toy_model

    model = ensure_toy_model(data_dir())
    servers: list[Server] = []
    # vLLM alone on core 1 (its child inherits this), everything else on core 0: CPU
    # vLLM's parallel loops stall whenever another process takes one of their cores,
    # which would charge the proxies for the contention rather than for their work.
    os.sched_setaffinity(0, {1})
    config = toy_model_config(model, TOY, log_path=work / "vllm.log",
                              env={"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"})
    with VLLMProcess(config) as vllm:
        os.sched_setaffinity(0, {0})
        try:
            port = free_port()
            servers.append(start_nextstate(vllm.url, port, 0, work, name="nextstate-vllm"))
            targets: list[tuple[str, int, Server | None]] = [
                (DIRECT, vllm.port, None), (NEXTSTATE, port, servers[-1])]
            if not args.no_litellm:
                port = free_port()
                servers.append(start_litellm(vllm.url, port, 0, work, model=TOY))
                targets.append((LITELLM, port, servers[-1]))
            runs = run(_measure(targets, 2 if not args.quick else 1,
                                8.0 if not args.quick else 3.0))
            for server in servers:
                server.stop()
            servers = []
            (work / "publish").mkdir(exist_ok=True)
            proxy = start_nextstate(vllm.url, free_port(), 0, work / "publish",
                                    extra=("--policy", TOY), name="nextstate-policy")
            servers.append(proxy)
            converse(proxy.url + "/v1", 4)
            time.sleep(1.0)  # the recorder stores them
            publish = run(_publish_under_load(proxy, vllm.url, model, work))
        finally:
            for server in servers:
                server.stop()
    return _section(runs, publish)


def _section(runs: list[Run], publish: dict[str, Any]) -> str:
    b, d = publish["before"], publish["during"]
    return "\n\n".join([
        "## End to end: vLLM (CPU) with the toy model",
        "vLLM alone on core 1, proxies and load generator on core 0; 2 rounds, "
        "concurrency 1 and 4, max_tokens 32, temperature 0. CPU ms/req is the proxy's own.",
        ratio_table(runs), scenario_table(runs),
        "## Publishing adapters under load",
        f"Concurrency 4 (2 whole + 2 streaming, max_tokens 8) through a proxy with "
        f"`--policy {TOY}` while the learner trains and publishes "
        f"({publish['seconds']:.0f} s; learner exit code {publish['learner_exit']}; "
        f"the proxy then served `{publish['serving']}`).",
        "| phase | requests | failed | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|\n"
        f"| before | {b['requests']} | {b['failed']} | {b['p50_ms']:.1f} | {b['p99_ms']:.1f} |\n"
        f"| during publish | {d['requests']} | {d['failed']} | {d['p50_ms']:.1f} | "
        f"{d['p99_ms']:.1f} |"])


async def _learn(args: argparse.Namespace) -> None:
    from nextstate.learner.process import Learner, LearnerConfig
    from nextstate.learner.trainer import TrainerConfig
    from nextstate.learner.training import TrainingConfig

    trainer = replace(TrainerConfig(), batch_turns=4)
    learner = Learner(LearnerConfig(
        store_url=args.store, backends=(args.backend,), base_model=TOY,
        model_dir=Path(args.model_dir), adapters_dir=Path(args.adapters),
        training=TrainingConfig(trainer=trainer, unload_grace=0.0)))
    try:
        for _ in range(6):
            if not await learner.step():
                break
        print(learner.status(), flush=True)
    finally:
        await learner.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="the learner step of the publish bench")
    sub = parser.add_subparsers(dest="command", required=True)
    learn = sub.add_parser("learn")
    for flag in ("--store", "--backend", "--model-dir", "--adapters"):
        learn.add_argument(flag, required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_learn(args))


if __name__ == "__main__":
    main()
