"""``nextstate bench personal``: two personas with opposite tastes, one shared adapter
against an adapter each (simulated users -> proxy -> vLLM -> store -> learner ->
adapters -> vLLM).

The student wants casual replies that end with encouragement, the teacher formal ones
with no closing; both want the steps shown, in detail. Their conversations run
interleaved through one proxy and one learner, each persona a user (``X-NextState-User``)
asking the same kind of problems. Twice, from the same base model and seed:

- ``shared``: one adapter learns from both, as OpenClaw-RL trains one model for all;
- ``personal``: ``--personal-after N``: a persona with N judged turns trains its own.

A step is two optimizer steps in either mode (shared: two versions of the one adapter;
personal: one version of each persona's), so both modes get the same traffic and the
same compute. After every step each persona rates first replies to held-out problems,
asked with its own user header and recording off, and with a fixed sampling seed per
problem, so that both modes' scores differ by their adapters and not by sampling luck.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from nextstate.core.lora import PUBLISHED
from nextstate.core.vllm_server import free_port
from nextstate.experiment.bench import BASE_MODEL, save_results, serving_trained_toy
from nextstate.experiment.client import RetryingTransport
from nextstate.experiment.personas import Persona, SimulatedUser
from nextstate.experiment.run import BenchConfig, Progress
from nextstate.experiment.styles import make_problem
from nextstate.experiment.traffic import conversation, evaluate
from nextstate.learner.process import Learner, LearnerConfig
from nextstate.learner.trainer import TrainerConfig
from nextstate.learner.training import TrainingConfig
from nextstate.proxy.server import BackgroundProxy
from nextstate.proxy.settings import ProxySettings

MODES = ("shared", "personal")
OPTIMIZER_STEPS_PER_STEP = 2


@dataclass
class ModeRun:
    mode: str
    seed: int
    scores: dict[str, list[float]] = field(default_factory=dict)  # persona -> per step
    versions: list[list[str]] = field(default_factory=list)  # published in each step
    turns_recorded: list[int] = field(default_factory=list)
    # persona -> per step: how often each of its preferences was met
    attributes: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    seconds: float = 0.0
    retries: dict[str, int] = field(default_factory=dict)  # by cause (client.py)


async def run_mode(personas: Sequence[Persona], mode: str, config: BenchConfig, *,
                   personal_after: int, vllm_url: str, base_model: str, model_dir: Path,
                   workdir: Path, progress: Progress = print) -> ModeRun:
    policy = f"pair-{mode}-s{config.seed}"
    store_url = f"sqlite:///{workdir / policy}.db"
    settings = ProxySettings(backends=(vllm_url,), store_url=store_url,
                             spool_dir=workdir / "spool" / policy, policy=policy,
                             base_model=base_model, adapter_poll_seconds=0.05)
    trainer = TrainerConfig(method="combined", batch_turns=config.batch_turns,
                            learning_rate=config.learning_rate, passes=config.passes,
                            seed=config.seed)
    learner = Learner(LearnerConfig(
        store_url=store_url, backends=(vllm_url,), base_model=base_model, policy=policy,
        model_dir=model_dir, adapters_dir=workdir / "adapters",
        training=TrainingConfig(trainer=trainer, unload_grace=5.0, personal_min_turns=(
            personal_after if mode == "personal" else None))))
    run = ModeRun(mode=mode, seed=config.seed, scores={p.name: [] for p in personas},
                  attributes={p.name: [] for p in personas})
    started = time.monotonic()
    eval_set = [make_problem(random.Random(f"eval-{config.seed}-{i}"))
                for i in range(config.eval_problems)]
    traffic = random.Random(f"traffic-{config.seed}")
    with BackgroundProxy(settings, free_port()) as proxy:
        # As a real agent's client: transient failures are retried (and counted).
        users = {p.name: RetryingTransport() for p in personas}
        clients = {p.name: httpx.AsyncClient(base_url=proxy.base_url, timeout=600,
                                             headers={"X-NextState-User": p.name},
                                             transport=users[p.name])
                   for p in personas}
        try:
            for step in range(config.steps + 1):
                if step:
                    recorded, versions = await train_step(clients, learner, policy, personas,
                                                          traffic, config, mode)
                    run.turns_recorded.append(recorded)
                    run.versions.append(versions)
                    await until_serving(clients[personas[0].name], learner, policy)
                for p in personas:
                    score, met = await evaluate(clients[p.name], policy, p, eval_set, config,
                                                seeded=True)
                    run.scores[p.name].append(score)
                    run.attributes[p.name].append(met)
                progress(f"{mode:>8} seed {config.seed}: step {step} "
                         + "  ".join(f"{p.name} {run.scores[p.name][-1]:.3f}" for p in personas)
                         + (f"  ({', '.join(run.versions[-1])})" if step else ""))
        finally:
            for client in clients.values():
                await client.aclose()
            await learner.close()
            run.retries = dict(sum((u.retries for u in users.values()), Counter()))
    run.seconds = time.monotonic() - started
    return run


def published(learner: Learner, policy: str) -> dict[str, str]:
    """Versions published so far: {name: policy} (the shared policy and personal ones)."""
    return {a["name"]: a["policy"] for a in learner.store.adapters.versions()
            if a["status"] in PUBLISHED
            and (a["policy"] == policy or a["policy"].startswith(policy + "~"))}


async def train_step(clients: dict[str, httpx.AsyncClient], learner: Learner, policy: str,
                     personas: Sequence[Persona], rng: random.Random, config: BenchConfig,
                     mode: str, max_rounds: int = 40) -> tuple[int, list[str]]:
    """Both personas talk, interleaved, until this step's optimizer steps are published:
    two versions of the shared adapter, or one of each persona's own. Returns (turns of
    traffic, the versions published)."""
    before = published(learner, policy)
    recorded = 0
    for _ in range(max_rounds):
        who = [personas[i % len(personas)] for i in range(config.concurrency)]
        users = [SimulatedUser(p, random.Random(rng.random())) for p in who]
        problems = [make_problem(rng) for _ in users]
        counts = await asyncio.gather(*(
            conversation(clients[u.persona.name], policy, u, problem, config)
            for u, problem in zip(users, problems, strict=True)))
        recorded += sum(counts)
        await asyncio.sleep(0.1)  # the proxy writes records off the request path
        while await learner.step() and not _done(learner, policy, personas, before, mode):
            pass
        if _done(learner, policy, personas, before, mode):
            return recorded, sorted(set(published(learner, policy)) - set(before))
    raise RuntimeError(f"{mode}: not published after {max_rounds} rounds of traffic; "
                       f"learner: {learner.status()['totals']}")


def _done(learner: Learner, policy: str, personas: Sequence[Persona],
          before: dict[str, str], mode: str) -> bool:
    new = Counter(p for name, p in published(learner, policy).items() if name not in before)
    if mode == "shared":
        return new[policy] >= OPTIMIZER_STEPS_PER_STEP
    return all(new[f"{policy}~{p.name}"] >= 1 for p in personas)


async def until_serving(client: httpx.AsyncClient, learner: Learner, policy: str) -> None:
    """The proxy follows the store; wait until it serves every current version."""
    current = learner.store.adapters.currents(policy)
    shared = current.pop(policy, (None, None))[0]
    personal = {p: name for p, (name, _) in current.items()}
    for _ in range(200):
        status = (await client.get("/learner/status")).json()
        if status.get("serving") == shared and status.get("serving_personal") == personal:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the proxy did not switch {policy} to {shared} and {personal}")


def summarise(runs: list[ModeRun], personas: Sequence[str]) -> dict[str, Any]:
    """Per mode and persona: the mean (and spread) of the score per step over seeds."""
    out: dict[str, Any] = {}
    for mode in dict.fromkeys(r.mode for r in runs):
        mine = [r for r in runs if r.mode == mode]
        out[mode] = {"seconds": sum(r.seconds for r in mine)}
        for name in personas:
            per_step = list(zip(*(r.scores[name] for r in mine), strict=True))
            out[mode][name] = {"mean": [statistics.fmean(s) for s in per_step],
                               "min": [min(s) for s in per_step],
                               "max": [max(s) for s in per_step],
                               "adapter_steps": statistics.fmean(
                                   adapter_steps(r, name) for r in mine),
                               "met_at_end": {a: statistics.fmean(
                                   r.attributes[name][-1][a] for r in mine)
                                   for a in mine[0].attributes.get(name, [{}])[-1]}}
    return out


def adapter_steps(run: ModeRun, persona: str) -> int:
    """Optimizer steps that shaped the adapter serving ``persona`` (the learner trains
    the adapter with the most turns waiting, so a persona may get an extra one)."""
    mine = (lambda name: f"~{persona}@" in name) if run.mode == "personal" else (
        lambda name: "~" not in name)
    return sum(1 for names in run.versions for name in names if mine(name))


def run_personal_benchmark(personas: Sequence[Persona], config: BenchConfig, out: Path,
                           personal_after: int = 1, seeds: Sequence[int] = (0,),
                           progress: Progress = print) -> dict[str, Any]:
    started = time.monotonic()
    runs: list[ModeRun] = []
    results: dict[str, Any] = {}
    with serving_trained_toy(out, progress) as (vllm, model_dir):
        for seed in seeds:
            for mode in MODES:
                runs.append(asyncio.run(run_mode(
                    personas, mode, replace(config, seed=seed), personal_after=personal_after,
                    vllm_url=vllm.url, base_model=BASE_MODEL, model_dir=model_dir,
                    workdir=out / "work", progress=progress)))
            # Written after every seed, so that a long run that is stopped keeps its seeds.
            results = write_results(out, personas, config, personal_after, runs, started)
    return results


def write_results(out: Path, personas: Sequence[Persona], config: BenchConfig,
                  personal_after: int, runs: list[ModeRun], started: float) -> dict[str, Any]:
    results = {
        "personas": {p.name: p.prefers for p in personas},
        "config": asdict(config), "personal_after": personal_after,
        "seeds": sorted({r.seed for r in runs}),
        "optimizer_steps_per_step": OPTIMIZER_STEPS_PER_STEP,
        "modes": summarise(runs, [p.name for p in personas]),
        "runs": [asdict(r) for r in runs],
        "wall_seconds": time.monotonic() - started,
    }
    return save_results(out, results, plot_personal, "personal_adapters.png", markdown_table)


def markdown_table(results: dict[str, Any]) -> str:
    """Each persona's score, shared adapter against its own, at a few steps."""
    modes = results["modes"]
    names = list(results["personas"])
    steps = len(modes["shared"][names[0]]["mean"]) - 1
    marks = sorted({0, min(2, steps), min(4, steps), steps})
    spread = len(results["seeds"]) > 1
    lines = ["| persona | adapter | " + " | ".join(f"step {s}" for s in marks)
             + " | its optimizer steps |", "|" + "---|" * (len(marks) + 3)]
    for name in [*names, "mean"]:
        for mode in MODES:
            if name == "mean":
                curve = [statistics.fmean(modes[mode][n]["mean"][s] for n in names)
                         for s in range(steps + 1)]
                cells = [f"{curve[s]:.2f}" for s in marks] + [""]
            else:
                m = modes[mode][name]
                cells = [f"{m['mean'][s]:.2f}" + (f" ({m['min'][s]:.2f}-{m['max'][s]:.2f})"
                                                   if spread else "") for s in marks]
                cells.append(f"{m['adapter_steps']:g}")
            label = "both (mean)" if name == "mean" else name
            lines.append(f"| {label} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + _preferences_met(results, steps)


def _preferences_met(results: dict[str, Any], steps: int) -> str:
    """How often each preference was met at the last step: where a shared adapter has
    to take sides."""
    lines = ["", f"Preferences met at step {steps}:", ""]
    for name, prefers in results["personas"].items():
        lines += [f"| {name} | " + " | ".join(f"{a}: {v}" for a, v in prefers.items()) + " |",
                  "|" + "---|" * (len(prefers) + 1)]
        for mode in MODES:
            met = results["modes"][mode][name].get("met_at_end") or {}
            lines.append(f"| {mode} | " + " | ".join(
                f"{met[a]:.2f}" if a in met else "-" for a in prefers) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_personal(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display here
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colors = {"student": "#d95f02", "teacher": "#1b9e77"}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for mode, style in (("shared", "--"), ("personal", "-")):
        for name, m in results["modes"][mode].items():
            if name == "seconds":
                continue
            steps = list(range(len(m["mean"])))
            color = colors.get(name, "gray")
            ax.plot(steps, m["mean"], style, marker="o", color=color,
                    label=f"{name}, {mode} adapter")
            if len(results["seeds"]) > 1:
                ax.fill_between(steps, m["min"], m["max"], color=color, alpha=0.1)
    ax.set_xlabel(f"steps ({results['optimizer_steps_per_step']} optimizer steps of "
                  f"{results['config']['batch_turns']} judged turns each)")
    ax.set_ylabel("personalization score")
    ax.set_ylim(0, 1.02)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    seeds = len(results["seeds"])
    ax.set_title("Two personas with opposite tastes: one shared adapter vs one each\n"
                 f"(held-out first replies; mean of {seeds} seed{'s' if seeds > 1 else ''})",
                 fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
