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
"""

from __future__ import annotations

import asyncio
import random
import shutil
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx

from nextstate.core.lora import AdapterStatus
from nextstate.core.store.curves import BASE_ADAPTER
from nextstate.core.vllm_server import free_port
from nextstate.experiment.client import RetryingTransport
from nextstate.experiment.personas import Persona, SimulatedUser
from nextstate.experiment.styles import Problem, make_problem
from nextstate.learner.process import Learner, LearnerConfig
from nextstate.learner.trainer import TrainerConfig
from nextstate.learner.training import TrainingConfig
from nextstate.proxy.server import BackgroundProxy
from nextstate.proxy.settings import ProxySettings

BENCHMARK = "learning"  # the scores' name in the store (the dashboard's curves)

Progress = Callable[[str], None]
METHODS = ("binary", "opd", "combined")
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


@dataclass
class MethodRun:
    method: str
    seed: int
    scores: list[float] = field(default_factory=list)  # index = training steps so far
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


async def run_method(persona: Persona, method: str, config: BenchConfig, *, vllm_url: str,
                     base_model: str, model_dir: Path, workdir: Path,
                     progress: Progress = print) -> MethodRun:
    policy = f"{persona.name}-{method}-s{config.seed}"
    home = workdir / policy  # a fresh store and adapters: a re-run never sees the last one
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    store_url = f"sqlite:///{home / 'store.db'}"
    settings = ProxySettings(backends=(vllm_url,), store_url=store_url,
                             spool_dir=home / "spool", policy=policy,
                             base_model=base_model, adapter_poll_seconds=0.05)
    trainer = TrainerConfig(method=method, batch_turns=config.batch_turns,  # type: ignore[arg-type]
                            learning_rate=config.learning_rate, passes=config.passes,
                            seed=config.seed)
    learner = Learner(LearnerConfig(
        store_url=store_url, backends=(vllm_url,), base_model=base_model, policy=policy,
        model_dir=model_dir, adapters_dir=home / "adapters",
        training=TrainingConfig(trainer=trainer, unload_grace=5.0)))
    run = MethodRun(method=method, seed=config.seed)
    started = time.monotonic()
    eval_set = [make_problem(random.Random(f"eval-{config.seed}-{i}"))
                for i in range(config.eval_problems)]
    traffic = random.Random(f"traffic-{config.seed}")
    users = RetryingTransport()  # as a real agent's client: transient failures retried
    with BackgroundProxy(settings, free_port()) as proxy:
        async with httpx.AsyncClient(base_url=proxy.base_url, timeout=600,
                                     transport=users) as client:
            speaker = speaker_for(config.api, client, proxy.url)
            try:
                run.scores.append(await evaluate(client, policy, persona, eval_set, config))
                _record(learner, policy, f"{policy}{BASE_ADAPTER}", run.scores[-1])
                progress(f"{method:>8} seed {config.seed}: step 0 score {run.scores[0]:.3f}")
                for step in range(1, config.steps + 1):
                    trained = await train_one_step(client, learner, policy, persona,
                                                   traffic, config, run, step, speaker)
                    if trained is None:
                        run.stalled_after = step - 1
                        progress(f"{method:>8} seed {config.seed}: no step {step}: too few "
                                 f"turns with a signal in {MAX_ROUNDS} rounds of traffic "
                                 f"(the persona stopped correcting); the policy stays as "
                                 f"it is")
                        break
                    recorded, version = trained
                    run.turns_recorded.append(recorded)
                    run.versions.append(version)
                    await _until_serving(client, policy, version)
                    run.scores.append(await evaluate(client, policy, persona, eval_set,
                                                     config))
                    _record(learner, policy, version, run.scores[-1])
                    progress(f"{method:>8} seed {config.seed}: step {step} score "
                             f"{run.scores[-1]:.3f} ({version}, {recorded} turns of traffic)")
            finally:
                await speaker.aclose()
                await learner.close()
                run.retries = dict(users.retries)
    run.seconds = time.monotonic() - started
    if run.retries:
        progress(f"{method:>8} seed {config.seed}: the users retried "
                 + ", ".join(f"{n} x {cause}" for cause, n in run.retries.items()))
    return run


async def train_one_step(client: httpx.AsyncClient, learner: Learner, policy: str,
                         persona: Persona, rng: random.Random, config: BenchConfig,
                         run: MethodRun | None = None, step: int = 0,
                         speaker: Speaker | None = None,
                         max_rounds: int = MAX_ROUNDS) -> tuple[int, str] | None:
    """Talk until the learner publishes a new version; returns (turns of traffic, name),
    or None when ``max_rounds`` of conversations did not give it a batch: with distillation
    only corrected turns teach, and a persona that is pleased stops correcting. What the
    publish gate did on the way (a refusal, a step taken smaller) goes into ``run``."""
    before = learner.store.adapters.current(policy)
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
        history = learner.training.history if learner.training else []
        if run is not None and history and history[-1] is not last:
            _gate_events(run, step, history[-1])
        current = learner.store.adapters.current(policy)
        if current is not None and current != before:
            return recorded, str(current["name"])
    return None


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


class Speaker(Protocol):
    """How a simulated user sends a conversation and reads the reply's text."""

    async def reply(self, policy: str, messages: list[dict[str, str]], session: str,
                    config: BenchConfig) -> str: ...

    async def aclose(self) -> None: ...


class ChatSpeaker:
    """Chat Completions, as any OpenAI-SDK agent."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def reply(self, policy: str, messages: list[dict[str, str]], session: str,
                    config: BenchConfig) -> str:
        answer = await self.client.post(
            "/chat/completions", headers={"X-Session-Id": session},
            json={"model": policy, "messages": messages, "temperature": config.temperature,
                  "max_tokens": config.max_tokens})
        answer.raise_for_status()
        return str(answer.json()["choices"][0]["message"]["content"] or "")

    async def aclose(self) -> None:
        pass  # the client is the caller's


class MessagesSpeaker:
    """Anthropic Messages through the official SDK (``ANTHROPIC_BASE_URL`` at the proxy),
    as Claude Code talks. The SDK retries transient failures itself, by the same policy
    as `RetryingTransport` (it brings its own HTTP client), so its retries go uncounted."""

    def __init__(self, proxy_url: str) -> None:
        import anthropic

        self.sdk = anthropic.AsyncAnthropic(base_url=proxy_url, api_key="unused",
                                            timeout=600)

    async def reply(self, policy: str, messages: list[dict[str, str]], session: str,
                    config: BenchConfig) -> str:
        # (The SDK has no temperature argument any more: it goes in the body, as vLLM's
        # Messages route and the proxy read it.)
        answer = await self.sdk.messages.create(
            model=policy, messages=messages, max_tokens=config.max_tokens,  # type: ignore[arg-type]
            extra_body={"temperature": config.temperature},
            extra_headers={"X-Session-Id": session})
        return "".join(block.text for block in answer.content if block.type == "text")

    async def aclose(self) -> None:
        await self.sdk.close()


def speaker_for(api: str, client: httpx.AsyncClient, proxy_url: str) -> Speaker:
    return MessagesSpeaker(proxy_url) if api == "messages" else ChatSpeaker(client)


async def conversation(client: httpx.AsyncClient, policy: str, user: SimulatedUser,
                       problem: Problem, config: BenchConfig,
                       speaker: Speaker | None = None) -> int:
    """One problem: the user reads up to ``max_turns`` replies, correcting until pleased.
    Its last answer is sent as the last turn's next state. Returns the turns it made."""
    speaker = speaker or ChatSpeaker(client)
    session = uuid.uuid4().hex
    messages: list[dict[str, str]] = [{"role": "user", "content": problem.question}]
    for turn in range(user.persona.max_turns):
        reply = await speaker.reply(policy, messages, session, config)
        satisfied, said = user.react(reply)
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": said}]
        if satisfied or turn == user.persona.max_turns - 1:
            done = await client.post("/next_state", json={
                "session_id": session, "messages": [{"role": "user", "content": said}],
                "done": True, "source": "adapter:bench"})
            done.raise_for_status()
            return turn + 1
    return user.persona.max_turns


async def evaluate(client: httpx.AsyncClient, policy: str, persona: Persona,
                   problems: list[Problem], config: BenchConfig) -> float:
    """The persona's mean rating of first replies to held-out problems (not recorded)."""
    gate = asyncio.Semaphore(config.concurrency)

    async def rate(problem: Problem) -> list[float]:
        async with gate:
            answer = await client.post(
                "/chat/completions", headers={"X-NextState-Record": "off"},
                json={"model": policy, "n": config.eval_samples,
                      "temperature": config.temperature, "max_tokens": config.max_tokens,
                      "messages": [{"role": "user", "content": problem.question}]})
            answer.raise_for_status()
            return [persona.score(c["message"]["content"] or "")
                    for c in answer.json()["choices"]]

    ratings = await asyncio.gather(*(rate(p) for p in problems))
    return statistics.fmean(r for rs in ratings for r in rs)


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
        }
    return out


def _padded(scores: list[float], length: int) -> list[float]:
    """A stalled run's policy no longer changes: its last score stands for later steps."""
    return scores + scores[-1:] * (length - len(scores))
