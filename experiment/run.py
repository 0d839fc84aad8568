"""The learning benchmark: the OpenClaw-RL paper's personalization experiment in miniature,
through the real stack (simulated user -> proxy -> vLLM -> store -> learner -> adapter ->
vLLM).

For each method, a fresh store and policy: simulated users ask problems and answer the
replies (thanks, or a correction), over Chat Completions or, with ``api="messages"``,
through the Anthropic SDK as Claude Code would; the learner judges those turns with the
`rules` judge,
takes one optimizer step per ``batch_turns`` judged turns and publishes the adapter; after
every step the persona rates the first reply to each of a fixed set of held-out problems,
sent with recording off so that evaluation is never trained on. Each score is kept in the
run's store beside the version it rated (`Curves.record_score`): the dashboard's learning
curves show it.

The memory arms (`memory`: lessons alone; ``memory+combined``: lessons distilled into the
adapter, which retires them) run the proxy with its memory on and the learner learning
lessons; a step of ``memory`` alone is the same ``batch_turns`` judged turns of traffic.
After each step, memory+combined checks every lesson against the new adapter before it is
rated, as a deployed learner (a retirement round a second) does between steps.
Every arm first answers four problems one at a time and is rated after the second and the
fourth (before any training step can happen: what the first corrections did).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from nextstate.core.lora import AdapterStatus
from nextstate.core.sessions import USER_HEADER
from nextstate.core.store.curves import BASE_ADAPTER
from nextstate.core.vllm_server import free_port
from nextstate.experiment.client import RetryingTransport
from nextstate.experiment.memory import (
    Arm,
    arm,
    injected_tokens,
    lesson_counts,
    until_indexed,
)
from nextstate.experiment.personas import Persona, SimulatedUser
from nextstate.experiment.styles import Problem, make_problem
from nextstate.experiment.traffic import (
    ChatSpeaker,
    Speaker,
    conversation,
    evaluate,
    speaker_for,
)
from nextstate.learner.config import MemoryConfig, TeacherKind
from nextstate.learner.process import Learner, LearnerConfig
from nextstate.learner.trainer import TrainerConfig
from nextstate.learner.training import TrainingConfig
from nextstate.proxy.server import BackgroundProxy
from nextstate.proxy.settings import MemorySettings, ProxySettings

BENCHMARK = "learning"  # the scores' name in the store (the dashboard's curves)

Progress = Callable[[str], None]
METHODS = ("binary", "opd", "combined")
MEMORY_ARMS = ("memory", "memory+combined")
EARLY = (2, 4)  # problems answered one at a time before the first step, rated after each
MAX_ROUNDS = 40  # rounds of `concurrency` conversations to wait for one training step


@dataclass(frozen=True)
class BenchConfig:
    steps: int = 8
    batch_turns: int = 16  # judged turns per optimizer step, as in the paper
    eval_problems: int = 32
    eval_samples: int = 4  # replies rated per evaluation problem
    temperature: float = 1.0
    max_tokens: int = 160
    concurrency: int = 8  # simultaneous conversations
    learning_rate: float | None = None  # trainer default (1e-3 for the toy model)
    passes: int = 2
    seed: int = 0
    # How the simulated users talk to the proxy: Chat Completions, or Anthropic Messages
    # through the official SDK. (Evaluation always asks the chat route, recording off: it
    # measures the policy, whichever API trained it.)
    api: Literal["chat", "messages"] = "chat"
    # The teacher of distillation: the frozen base model shown the hint (the paper's
    # choice), or the adapter serving the user shown the hint (`nextstate learn --teacher`).
    teacher: TeacherKind = "base"
    # The memory arms: lessons a request gets at most (None: the proxy's default).
    memory_lessons: int | None = None


@dataclass
class MethodRun:
    method: str
    seed: int
    scores: list[float] = field(default_factory=list)  # index = training steps so far
    # How often each preference was met, per step as ``scores`` (attribute -> share).
    met: list[dict[str, float]] = field(default_factory=list)
    turns_recorded: list[int] = field(default_factory=list)  # traffic turns per step
    versions: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # Set when the persona stopped correcting: no step after this many, for want of
    # signal; the policy is unchanged from then on, so later scores repeat the last one.
    stalled_after: int | None = None
    # Requests the simulated users sent again after a transient failure, by cause.
    retries: dict[str, int] = field(default_factory=dict)
    # Steps the publish gate refused (their turns are skipped, the traffic goes on):
    # {"step": the step being waited for, "kl": nats/token, "reason": ...}.
    refused: list[dict[str, Any]] = field(default_factory=list)
    # Steps published only at a smaller learning rate: {"step", "kl_first_try", "kl",
    # "lr_scale"}.
    slowed: list[dict[str, Any]] = field(default_factory=list)
    # The score after the first 2 and 4 problems, answered one at a time: {"2", "4"}.
    early: dict[str, float] = field(default_factory=dict)
    # Memory arms, per step: the lessons' states after it, the prompt tokens the lessons
    # added a request of its traffic, and (with training) the score with the memory off:
    # the adapter alone.
    lessons: list[dict[str, int]] = field(default_factory=list)
    injected: list[dict[str, float]] = field(default_factory=list)
    weights_only: list[float] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)  # every retirement check


async def run_method(persona: Persona, method: str, config: BenchConfig, *, vllm_url: str,
                     base_model: str, model_dir: Path, workdir: Path,
                     progress: Progress = print) -> MethodRun:
    kind = arm(method)
    policy = f"{persona.name}-{method.replace('+', '-')}-s{config.seed}"
    home = workdir / policy  # a fresh store and adapters: a re-run never sees the last one
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    store_url = f"sqlite:///{home / 'store.db'}"
    settings = ProxySettings(backends=(vllm_url,), store_url=store_url,
                             spool_dir=home / "spool", policy=policy,
                             base_model=base_model, adapter_poll_seconds=0.05,
                             memory=memory_settings(kind, config))
    trainer = TrainerConfig(method=kind.method or "combined", batch_turns=config.batch_turns,
                            learning_rate=config.learning_rate, passes=config.passes,
                            seed=config.seed)
    learner = Learner(LearnerConfig(
        store_url=store_url, backends=(vllm_url,), base_model=base_model, policy=policy,
        model_dir=model_dir if kind.trains else None, adapters_dir=home / "adapters",
        training=TrainingConfig(trainer=trainer, unload_grace=5.0),
        memory=MemoryConfig(learn=kind.memory), teacher=config.teacher))
    run = MethodRun(method=method, seed=config.seed)
    started = time.monotonic()
    eval_set = [make_problem(random.Random(f"eval-{config.seed}-{i}"))
                for i in range(config.eval_problems)]
    traffic = random.Random(f"traffic-{config.seed}")
    users = RetryingTransport()  # as a real agent's client: transient failures retried
    with BackgroundProxy(settings, free_port()) as proxy:
        async with httpx.AsyncClient(base_url=proxy.base_url, timeout=600, transport=users,
                                     headers={USER_HEADER: persona.name}) as client:
            speaker = speaker_for(config.api, client, proxy.url, persona.name)
            rate = Rater(client, proxy.url, learner, policy, persona, eval_set, config, kind)
            try:
                run.scores.append(await rate())
                run.met.append(rate.met)
                _record(learner, policy, f"{policy}{BASE_ADAPTER}", run.scores[-1])
                progress(f"{method:>8} seed {config.seed}: step 0 score {run.scores[0]:.3f}")
                early_turns = await first_problems(client, learner, policy, persona,
                                                   traffic, config, run, speaker, rate)
                progress(f"{method:>8} seed {config.seed}: after "
                         + ", ".join(f"{k} problems {v:.3f}" for k, v in run.early.items()))
                for step in range(1, config.steps + 1):
                    since = time.time()
                    trained = await train_one_step(client, learner, policy, persona,
                                                   traffic, config, run, step, speaker,
                                                   trains=kind.trains)
                    if trained is None:
                        run.stalled_after = step - 1
                        progress(f"{method:>8} seed {config.seed}: no step {step}: too few "
                                 f"turns with a signal in {MAX_ROUNDS} rounds of traffic "
                                 f"(the persona stopped correcting); the policy stays as "
                                 f"it is")
                        break
                    recorded, version = trained
                    run.turns_recorded.append(recorded + early_turns)
                    early_turns = 0
                    run.versions.append(version)
                    if kind.trains:
                        await _until_serving(client, policy, version)
                    if kind.memory and kind.trains:
                        await _check_every_lesson(learner)
                    run.scores.append(await rate())
                    run.met.append(rate.met)
                    _record(learner, policy, version, run.scores[-1])
                    note = await _memory_step(run, learner, rate, vllm_url, base_model,
                                              since, kind)
                    progress(f"{method:>8} seed {config.seed}: step {step} score "
                             f"{run.scores[-1]:.3f} ({version}, {recorded} turns of "
                             f"traffic){note}")
            finally:
                await speaker.aclose()
                await learner.close()
                run.retries = dict(users.retries)
    run.seconds = time.monotonic() - started
    if run.retries:
        progress(f"{method:>8} seed {config.seed}: the users retried "
                 + ", ".join(f"{n} x {cause}" for cause, n in run.retries.items()))
    return run


class Rater:
    """The persona's rating of the policy as users are served now: for a memory arm, once
    the proxy's memory has every lesson the learner made. ``met``: how often each of its
    preferences was met, at the last rating."""

    def __init__(self, client: httpx.AsyncClient, proxy_url: str, learner: Learner,
                 policy: str, persona: Persona, problems: list[Problem], config: BenchConfig,
                 kind: Arm) -> None:
        self.client, self.proxy_url, self.learner = client, proxy_url, learner
        self.policy, self.persona, self.problems = policy, persona, problems
        self.config, self.kind = config, kind
        self.met: dict[str, float] = {}

    async def __call__(self, memory: bool = True) -> float:
        if self.kind.memory:
            await until_indexed(self.client, self.proxy_url, self.learner.store)
        score, self.met = await evaluate(self.client, self.policy, self.persona,
                                         self.problems, self.config, memory=memory)
        return score


async def first_problems(client: httpx.AsyncClient, learner: Learner, policy: str,
                         persona: Persona, rng: random.Random, config: BenchConfig,
                         run: MethodRun, speaker: Speaker, rate: Rater) -> int:
    """The first problems one at a time, each judged (and remembered, for a memory arm)
    before the next; rated after each of `EARLY`. Returns the turns they made."""
    turns = 0
    for number in range(1, max(EARLY) + 1):
        user = SimulatedUser(persona, random.Random(rng.random()))
        turns += await conversation(client, policy, user, make_problem(rng), config, speaker)
        await asyncio.sleep(0.1)  # the proxy writes records off the request path
        await learner.step()
        if number in EARLY:
            run.early[str(number)] = await rate()
    return turns


async def _check_every_lesson(learner: Learner) -> None:
    """Retirement rounds until every lesson has been checked against the new adapter. The
    bench's users talk without pause, so the learner runs a round or two between steps; a
    deployed one, a round a second, checks all its lessons while traffic gathers a batch."""
    retirement = learner.retirement
    if retirement is None:
        return
    while True:
        checks = retirement.checks
        await learner.check_lessons()
        if retirement.checks == checks:
            return


async def _memory_step(run: MethodRun, learner: Learner, rate: Rater, vllm_url: str,
                       base_model: str, since: float, kind: Arm) -> str:
    """A memory arm's measures after a step (nothing for the others)."""
    if not kind.memory:
        return ""
    store = learner.store
    run.lessons.append(await asyncio.to_thread(lesson_counts, store))
    run.injected.append(await injected_tokens(store, vllm_url, base_model, since,
                                              time.time()))
    note = (f"; lessons {run.lessons[-1]}, {run.injected[-1]['mean']:.1f} tokens of "
            f"lessons a request")
    if kind.trains:
        run.weights_only.append(await rate(memory=False))
        run.checks = list(learner.retirement.history) if learner.retirement else []
        note += f", the adapter alone {run.weights_only[-1]:.3f}"
    return note


async def train_one_step(client: httpx.AsyncClient, learner: Learner, policy: str,
                         persona: Persona, rng: random.Random, config: BenchConfig,
                         run: MethodRun | None = None, step: int = 0,
                         speaker: Speaker | None = None,
                         max_rounds: int = MAX_ROUNDS,
                         trains: bool = True) -> tuple[int, str] | None:
    """Talk until the learner publishes a new version; returns (turns of traffic, name),
    or None when ``max_rounds`` of conversations did not give it a batch: with distillation
    only corrected turns teach, and a persona that is pleased stops correcting. What the
    publish gate did on the way (a refusal, a step taken smaller) goes into ``run``.
    Not ``trains`` (the memory alone): talk until ``batch_turns`` more turns are judged."""
    before = learner.store.adapters.current(policy)
    judged = learner.store.judgments.counts()["judged"]
    speaker = speaker or ChatSpeaker(client)
    recorded = 0
    for _ in range(max_rounds):
        users = [SimulatedUser(persona, random.Random(rng.random()))
                 for _ in range(config.concurrency)]
        problems = [make_problem(rng) for _ in users]
        counts = await asyncio.gather(*(conversation(client, policy, u, p, config, speaker)
                                        for u, p in zip(users, problems, strict=True)))
        recorded += sum(counts)
        await asyncio.sleep(0.1)  # the proxy writes records off the request path
        history = learner.training.history if learner.training else []
        last = history[-1] if history else None
        await learner.step()
        if not trains:
            if learner.store.judgments.counts()["judged"] - judged >= config.batch_turns:
                return recorded, "memory"
            continue
        history = learner.training.history if learner.training else []
        if run is not None and history and history[-1] is not last:
            _gate_events(run, step, history[-1])
        current = learner.store.adapters.current(policy)
        if current is not None and current != before:
            return recorded, str(current["name"])
    return None


def memory_settings(kind: Arm, config: BenchConfig) -> MemorySettings:
    """The proxy's memory for an arm: on for the memory arms, the index following the
    store at once (each step waits for it)."""
    lessons = {} if config.memory_lessons is None else {"lessons": config.memory_lessons}
    return MemorySettings(enabled=kind.memory, refresh_seconds=0.05, **lessons)


def _record(learner: Learner, policy: str, adapter: str, score: float) -> None:
    """The score of the version serving now, into the run's store: the dashboard's
    learning curves show it beside the training numbers."""
    learner.store.curves.record_score(policy, adapter, BENCHMARK, score)


def _gate_events(run: MethodRun, step: int, entry: dict[str, Any]) -> None:
    extra = entry.get("extra") or {}
    if entry["outcome"] == AdapterStatus.REFUSED:
        run.refused.append({"step": step, "kl": entry["kl"], "reason": entry.get("error")})
    elif entry["outcome"] == "published" and extra.get("lr_scale", 1.0) < 1.0:
        run.slowed.append({"step": step, "kl_first_try": extra.get("kl_first_try"),
                           "kl": entry["kl"], "lr_scale": extra["lr_scale"]})


async def _until_serving(client: httpx.AsyncClient, policy: str, version: str) -> None:
    """The proxy follows the store; wait until it serves the new version."""
    for _ in range(100):
        status = (await client.get("/learner/status")).json()
        if status.get("serving") == version:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the proxy did not switch {policy} to {version}")


def summarise(runs: list[MethodRun], steps: int | None = None) -> dict[str, Any]:
    """Mean (and spread) of the score per step, per method, over seeds; a stalled run's
    last score stands for the steps it could not take (up to ``steps``)."""
    out: dict[str, Any] = {}
    for method in dict.fromkeys(r.method for r in runs):
        mine = [r for r in runs if r.method == method]
        length = max(len(r.scores) for r in mine) if steps is None else steps + 1
        per_step = list(zip(*(_padded(r.scores, length) for r in mine), strict=True))
        out[method] = {
            "mean": [statistics.fmean(s) for s in per_step],
            "min": [min(s) for s in per_step],
            "max": [max(s) for s in per_step],
            "seeds": [asdict(r) for r in mine],
            "seconds": sum(r.seconds for r in mine),
            "stalled_after": [r.stalled_after for r in mine],
            "refused": [len(r.refused) for r in mine],  # steps the gate refused, per seed
            "slowed": [len(r.slowed) for r in mine],  # taken at a smaller learning rate
            "early": {k: statistics.fmean(r.early[k] for r in mine if k in r.early)
                      for k in dict.fromkeys(k for r in mine for k in r.early)},
            # the last rating's (a stalled run's policy did not change after it)
            "met_at_end": {a: statistics.fmean(r.met[-1][a] for r in mine)
                           for a in (mine[0].met[-1] if all(r.met for r in mine) else {})},
        }
        if any(r.lessons for r in mine):
            out[method]["memory"] = _memory_summary(mine)
    return out


def _memory_summary(runs: list[MethodRun]) -> dict[str, Any]:
    """Per step, means over seeds: lessons retired and served, tokens of lessons a
    request, the adapter's score alone."""
    def per_step(values: list[list[float]]) -> list[float]:
        length = min(len(v) for v in values)
        return [statistics.fmean(v[i] for v in values) for i in range(length)]

    return {
        "retired": per_step([[float(c.get("retired", 0)) for c in r.lessons] for r in runs]),
        "active": per_step([[float(c.get("active", 0)) for c in r.lessons] for r in runs]),
        "dropped": per_step([[float(c.get("dropped", 0)) for c in r.lessons] for r in runs]),
        "injected_tokens": per_step([[i["mean"] for i in r.injected] for r in runs]),
        "served_share": per_step([[i["served"] for i in r.injected] for r in runs]),
        # the share of seeds whose persona was handed over to the weights after the step
        "handed_over": per_step([[float(c.get("handed_over", 0)) for c in r.lessons]
                                 for r in runs]),
        "weights_only": (per_step([r.weights_only for r in runs])
                         if all(r.weights_only for r in runs) else []),
    }


def _padded(scores: list[float], length: int) -> list[float]:
    """A stalled run's policy no longer changes: its last score stands for later steps."""
    return scores + scores[-1:] * (length - len(scores))
