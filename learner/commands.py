"""The learner's commands of the ``nextstate`` CLI (store -> learner -> vLLM).

    nextstate learn --backend URL     judge, train and publish, until stopped (several
                                      GPUs: torchrun --nproc-per-node N --no-python
                                      nextstate learn ...)
    nextstate status                  what the learner is doing, with progress to the next step
    nextstate adapters list           every adapter version and its state
    nextstate adapters rollback V     make version V current again
    nextstate bench learning          the paper's personalization experiment in miniature
    nextstate bench personal          two opposite personas: shared vs personal adapters
    nextstate bench following         hint following per attribute, train vs held-out wording
    nextstate demo                    one persona, the combined method, live

Heavy imports (torch, transformers) happen inside the commands, so the proxy-only
install can list these commands without them.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from pathlib import Path
from typing import Any

import click

from nextstate.proxy.options import (
    TOY_MODEL_NAME,
    backend_key_option,
    backend_option,
    existing_store,
    require_learner_extra,
)
from nextstate.proxy.options import store_option as _store
from nextstate.proxy.settings import data_dir, default_store_url

_backend_key = backend_key_option


@click.command()
@backend_option(multiple=True, required=True,
                help="URL of a vLLM server (http://HOST:PORT, with or without /v1; "
                "repeatable: every adapter is published to each).")
@click.option("--model", "base_model", default=TOY_MODEL_NAME, show_default=True,
              help="vLLM's name for the base model (clients use it for the policy).")
@click.option("--model-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="The base model's weights (default: the toy model).")
@click.option("--no-train", is_flag=True, help="Only judge; never train.")
@_store
@_backend_key
@click.option("--judge", type=click.Choice(["rules", "llm"]), default="rules",
              show_default=True, help="rules: offline cues; llm: a judge model via litellm.")
@click.option("--judge-model", default=None,
              help="litellm model for --judge llm (default: the base model on --backend).")
@click.option("--judge-api-base", default=None)
@click.option("--method", type=click.Choice(["binary", "opd", "combined"]),
              default="combined", show_default=True)
@click.option("--batch-turns", type=click.IntRange(min=1), default=16, show_default=True,
              help="Judged turns per optimizer step.")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Default: 1e-3 for models under 100M parameters, else 2e-5.")
@click.option("--teacher", type=click.Choice(["base", "policy"]), default="base",
              show_default=True, help="Whose logprobs teach under a hint.")
@click.option("--personal-after", type=click.IntRange(min=1), default=None, metavar="N",
              help="Personal adapters: a user (X-NextState-User, or the API key's tenant) "
              "with N judged turns gets their own adapter, trained on their turns from then "
              "on. Default: one adapter for everyone.")
@click.option("--shard", is_flag=True,
              help="Under torchrun with N processes: each holds 1/N of the weights (FSDP), "
              "for a base model that does not fit one GPU.")
@click.option("--once", is_flag=True, help="Do one round of work and exit.")
def learn(backends: tuple[str, ...], base_model: str, model_dir: Path | None, no_train: bool,
          store: str | None, backend_api_key: str | None, judge: str, judge_model: str | None,
          judge_api_base: str | None,
          method: str, batch_turns: int, learning_rate: float | None, teacher: str,
          personal_after: int | None, shard: bool, once: bool) -> None:
    """Run the learner: judge recorded turns, train LoRA steps, publish adapters."""
    from dataclasses import replace

    require_learner_extra("nextstate learn")

    from nextstate.learner import ranks
    from nextstate.learner.process import Learner, LearnerConfig
    from nextstate.learner.trainer import TrainerConfig
    from nextstate.learner.training import TrainingConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    rank = ranks.start()
    if rank:  # launched as one of several: rank 0 is the learner, this one trains
        ranks.follow()
        ranks.leave()
        return
    if model_dir is None and not no_train:
        from nextstate.learner.toy_model import ensure_toy_model

        model_dir = ensure_toy_model(data_dir())
    trainer = replace(TrainerConfig(), method=method, batch_turns=batch_turns,
                      learning_rate=learning_rate, shard=shard)
    config = LearnerConfig(
        store_url=store or default_store_url(), backend_url=backends[0],
        backend_urls=backends, backend_api_key=backend_api_key,
        base_model=base_model, model_dir=None if no_train else model_dir,
        adapters_dir=data_dir() / "adapters", judge=judge, judge_model=judge_model,
        judge_api_base=judge_api_base, teacher=teacher,
        training=TrainingConfig(trainer=trainer, personal_min_turns=personal_after))

    async def go() -> None:
        learner = Learner(config)
        try:
            await (learner.step() if once else learner.run())
        finally:
            await learner.close()

    try:
        asyncio.run(go())
    finally:
        ranks.stop()
        ranks.leave()


@click.command()
@_store
def status(store: str | None) -> None:
    """What the learner is doing: state, counts, rewards, recent steps."""
    from nextstate.proxy.store import Store

    url = existing_store(store)
    db = Store(url)
    try:
        report = db.learner_status()
    finally:
        db.close()
    if report is None:
        raise click.ClickException(f"no learner has reported to the store at {url} yet: is "
                                   "`nextstate learn` running against it?")
    click.echo(render_status(report))


def render_status(report: dict[str, Any]) -> str:
    counts = report.get("counts", {})
    adapter = report.get("adapter")
    rewards = report.get("rewards", {})
    batch = int(report.get("batch_turns") or 16)
    ready = int(counts.get("ready", 0))
    filled = min(ready, batch)
    bar = "#" * round(20 * filled / batch) + "." * (20 - round(20 * filled / batch))
    age = report.get("age_seconds", 0.0)
    lines = [
        f"learner   {report.get('state', '?')} (reported {age:.0f}s ago, pid "
        f"{report.get('pid')}), judge {report.get('judge')}, method {report.get('method')}"
        + _ranks(report),
        f"serving   {adapter['name'] if adapter else 'the base model'}"
        + (f", published {_when(adapter['published_at'])}" if adapter else ""),
        f"next step [{bar}] {ready}/{batch} ready turns",
        *_personal_lines(report),
        "",
        "turns     " + "  ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()),
        "rewards   " + "  ".join(f"{k}: {v}" for k, v in (rewards.get("scores") or {}).items())
        + f"  with hints: {rewards.get('with_hints', 0)}"
        + f"  from feedback: {rewards.get('from_feedback', 0)}",
    ]
    steps = report.get("steps") or []
    if steps:
        lines += ["", f"{'version':>8} {'outcome':>10} {'turns':>6} {'loss':>9} {'adv':>8} "
                      f"{'clip':>6} {'kl':>8} {'tok/s':>8}"]
        for s in steps[-10:]:
            lines.append(f"{s.get('version') or '-':>8} {s['outcome']:>10} {s['turns']:>6} "
                         f"{s['loss']:>9.4f} {s['advantage_mean']:>8.4f} "
                         f"{s['clip_fraction']:>6.3f} {s['kl']:>8.4f} "
                         f"{s['tokens_per_second']:>8.0f}")
    errors = (report.get("totals") or {}).get("recent_errors") or []
    if errors:
        lines += ["", "recent errors:", *(f"  {e}" for e in errors[-5:])]
    return "\n".join(lines)


def _ranks(report: dict[str, Any]) -> str:
    n = int(report.get("ranks") or 1)
    if n == 1:
        return ""
    return f", training on {n} processes" + (" (FSDP)" if report.get("sharded") else "")


def _personal_lines(report: dict[str, Any]) -> list[str]:
    after = report.get("personal_after")
    if after is None:
        return []
    personal = report.get("personal") or {}
    names = ", ".join(f"{user} ({name})" for user, name in sorted(personal.items())[:5])
    more = f" and {len(personal) - 5} more" if len(personal) > 5 else ""
    return [f"personal  {len(personal)} users with their own adapter (after {after} judged "
            f"turns){': ' + names + more if personal else ''}"]


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


@click.group()
def adapters() -> None:
    """The adapter versions the learner published."""


@adapters.command("list")
@_store
def list_adapters(store: str | None) -> None:
    """Every version: its state, when it was published, its step's numbers."""
    from nextstate.learner.store import LearnerStore

    db = LearnerStore(existing_store(store))
    try:
        rows = db.adapters()
    finally:
        db.close()
    if not rows:
        click.echo("no adapters yet: the policy is served by the base model")
        return
    click.echo(f"{'name':<32} {'status':<10} {'published':<20} {'turns':>6} {'kl':>8}")
    for row in rows:
        stats = row.get("stats") or {}
        click.echo(f"{row['name']:<32} {row['status']:<10} {_when(row['published_at']):<20} "
                   f"{stats.get('turns', 0):>6} {stats.get('kl', 0.0):>8.4f}")


@adapters.command()
@click.argument("version", type=int)
@backend_option(required=True, help="URL of the vLLM server (the version is loaded there "
                "first).")
@_backend_key
@_store
def rollback(version: int, backend: str, backend_api_key: str | None, store: str | None,
             ) -> None:
    """Serve VERSION again (loaded into vLLM first, then made current)."""
    from nextstate.core.vllm import VLLMClient
    from nextstate.learner.publish import PublishError, load_verified
    from nextstate.learner.store import LearnerStore
    from nextstate.proxy.store.store import NOT_SERVABLE

    db = LearnerStore(existing_store(store))
    try:
        row = next((r for r in db.adapters() if r["version"] == version), None)
        if row is None or row["status"] in NOT_SERVABLE:
            raise click.ClickException(f"no published version {version}")
        if not Path(row["path"]).exists():
            raise click.ClickException(f"{row['name']}'s directory is gone ({row['path']})")

        async def load() -> None:
            vllm = VLLMClient(backend, backend_api_key)
            try:
                await load_verified(vllm, row["name"], Path(row["path"]))
            finally:
                await vllm.aclose()

        try:
            asyncio.run(load())
        except PublishError as exc:
            raise click.ClickException(str(exc)) from exc
        db.store.rollback(version)
    finally:
        db.close()
    click.echo(f"{row['name']} is current again")


@click.group()
def bench() -> None:
    """Benchmarks."""


@bench.command("learning")
@click.option("--personas", "personas_file", type=click.Path(exists=True, path_type=Path),
              default=None, help="A persona YAML file (default: the shipped student/teacher).")
@click.option("--persona", default="student", show_default=True)
@click.option("--method", type=click.Choice(["binary", "opd", "combined", "all"]),
              default="all", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Repeat with seeds 0..N-1 and report the mean and spread.")
@click.option("--eval-problems", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench/results/learning"),
              show_default=True)
def bench_learning(personas_file: Path | None, persona: str, method: str, steps: int,
                   seeds: int, eval_problems: int, out: Path) -> None:
    """Simulated users -> proxy -> vLLM -> learner: the learning curve of each method."""
    require_learner_extra("nextstate bench learning")
    from nextstate.learner.experiment.bench import run_benchmark
    from nextstate.learner.experiment.run import METHODS, BenchConfig

    chosen = _persona(personas_file, persona)
    methods = METHODS if method == "all" else (method,)
    config = BenchConfig(steps=steps, eval_problems=eval_problems)
    results = run_benchmark(chosen, methods, config, out, seeds=range(seeds),
                            progress=lambda m: click.echo(m, err=True))
    click.echo((out / "results.md").read_text())
    click.echo(f"results: {out / 'results.json'}\nplot:    {out / 'learning_curves.png'} "
               f"({results['wall_seconds'] / 60:.1f} min)")


@bench.command("following")
@click.option("--count", type=int, default=400, show_default=True,
              help="Probes per wording and form.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench/results/following"),
              show_default=True)
def bench_following(count: int, out: Path) -> None:
    """How often the hint-following toy model, served by vLLM, does what an instruction
    asks, per attribute, for train and held-out wordings."""
    import json

    from nextstate.learner.experiment.bench import BASE_MODEL, serving_trained_toy
    from nextstate.learner.experiment.following import markdown, measure, vllm_generator

    with serving_trained_toy(out, lambda m: click.echo(m, err=True)) as (vllm, _model_dir):
        results = measure(vllm_generator(vllm.url, BASE_MODEL), count=count)
    (out / "following.json").write_text(json.dumps(results, indent=2))
    (out / "following.md").write_text(markdown(results))
    click.echo(markdown(results))


@bench.command("personal")
@click.option("--personas", "personas_file", type=click.Path(exists=True, path_type=Path),
              default=None, help="A persona YAML file (default: the shipped student/teacher).")
@click.option("--pair", default="student,teacher", show_default=True,
              help="The two personas (comma-separated) whose traffic is interleaved.")
@click.option("--steps", type=click.IntRange(min=1), default=8, show_default=True,
              help="Steps of two optimizer steps each.")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--eval-problems", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--personal-after", type=click.IntRange(min=1), default=1, show_default=True,
              help="Judged turns before a persona trains its own adapter.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench/results/personal"),
              show_default=True)
def bench_personal(personas_file: Path | None, pair: str, steps: int, seeds: int,
                   eval_problems: int, personal_after: int, out: Path) -> None:
    """Two personas with opposite tastes: one shared adapter vs an adapter each."""
    require_learner_extra("nextstate bench personal")
    from nextstate.learner.experiment.personal import run_personal_benchmark
    from nextstate.learner.experiment.run import BenchConfig

    chosen = [_persona(personas_file, name.strip()) for name in pair.split(",")]
    results = run_personal_benchmark(
        chosen, BenchConfig(steps=steps, eval_problems=eval_problems), out,
        personal_after=personal_after, seeds=range(seeds),
        progress=lambda m: click.echo(m, err=True))
    click.echo((out / "results.md").read_text())
    click.echo(f"results: {out / 'results.json'}\nplot:    {out / 'personal_adapters.png'} "
               f"({results['wall_seconds'] / 60:.1f} min)")


@click.command()
@click.option("--persona", default="student", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Default: <data dir>/demo")
def demo(persona: str, steps: int, out: Path | None) -> None:
    """Watch an agent adapt to a simulated user: one persona, the combined method."""
    require_learner_extra("nextstate demo")
    from nextstate.learner.experiment.bench import run_benchmark
    from nextstate.learner.experiment.run import BenchConfig

    chosen = _persona(None, persona)
    out = out or data_dir() / "demo"
    click.echo(f"persona {chosen.name}: prefers "
               + ", ".join(f"{k} {v}" for k, v in chosen.prefers.items()), err=True)
    run_benchmark(chosen, ("combined",), BenchConfig(steps=steps), out,
                  progress=lambda m: click.echo(m, err=True))
    click.echo((out / "results.md").read_text())
    click.echo(f"plot: {out / 'learning_curves.png'}")


def _persona(path: Path | None, name: str) -> Any:
    from nextstate.learner.experiment.personas import PersonaError, load_personas

    try:
        personas = load_personas(path)
    except PersonaError as exc:
        raise click.ClickException(str(exc)) from exc
    if name not in personas:
        raise click.ClickException(f"no persona {name!r}; have: {', '.join(personas)}")
    return personas[name]
