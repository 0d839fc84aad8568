"""The learner's commands of the ``nextstate`` CLI (store -> learner -> vLLM).

    nextstate learn --backend URL     judge, train and publish, until stopped (several
                                      GPUs: torchrun --nproc-per-node N --no-python
                                      nextstate learn ...); --metrics-port serves its
                                      Prometheus metrics, --track logs its steps to
                                      W&B, MLflow or TensorBoard
    nextstate status                  what the learner is doing, with progress to the next step
    nextstate adapters list           every adapter version and its state
    nextstate adapters rollback V     make version V current again

Heavy imports (torch, transformers) happen inside the commands, so the proxy-only
install can list these commands without them.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from pathlib import Path
from typing import Any, get_args

import click

from nextstate.cli.options import (
    TOY_MODEL_NAME,
    backend_key_option,
    backend_option,
    existing_store,
    look_at_backend,
    memory_option,
    personal_after_option,
    require_learner_extra,
    store_option,
)
from nextstate.core.paths import data_dir, default_store_url
from nextstate.core.store.lessons import scope_label
from nextstate.learner.config import JudgeKind, LearnerConfig, Method, TeacherKind, TrainerConfig

# The options' defaults are the configuration's (learner/config.py: torch-free).
LEARNER = LearnerConfig(store_url="", backends=("http://defaults",), base_model="")
TRAINER = TrainerConfig()


@click.command()
@backend_option(multiple=True, required=True,
                help="URL of a vLLM server (http://HOST:PORT, with or without /v1; "
                "repeatable: every adapter is published to each).")
@click.option("--model", "base_model", default=TOY_MODEL_NAME, show_default=True,
              help="vLLM's name for the base model (clients use it for the policy).")
@click.option("--model-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="The base model's weights (default: the toy model).")
@click.option("--no-train", is_flag=True, help="Only judge; never train.")
@store_option
@backend_key_option
@click.option("--judge", type=click.Choice(get_args(JudgeKind)), default=LEARNER.judge,
              show_default=True, help="rules: offline cues; llm: a judge model via litellm.")
@click.option("--judge-model", default=None,
              help="litellm model for --judge llm (default: the base model on --backend).")
@click.option("--judge-api-base", default=None)
@click.option("--method", type=click.Choice(get_args(Method)), default=TRAINER.method,
              show_default=True)
@click.option("--batch-turns", type=click.IntRange(min=1), default=TRAINER.batch_turns,
              show_default=True,
              help="Judged turns per optimizer step.")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Default: 1e-3 for models under 100M parameters, else 2e-5.")
@click.option("--teacher", type=click.Choice(get_args(TeacherKind)),
              default=LEARNER.teacher, show_default=True, help="Whose logprobs teach under a hint.")
@personal_after_option
@click.option("--shard", is_flag=True,
              help="Under torchrun with N processes: each holds 1/N of the weights (FSDP), "
              "for a base model that does not fit one GPU.")
@memory_option
@click.option("--once", is_flag=True, help="Do one round of work and exit.")
@click.option("--metrics-port", type=click.IntRange(min=0, max=65535), default=None,
              help="Serve the learner's Prometheus metrics on this port (GET /metrics).")
@click.option("--metrics-host", default="127.0.0.1", show_default=True,
              help="The address --metrics-port listens on.")
@click.option("--track", type=click.Choice(["wandb", "mlflow", "tensorboard"]),
              multiple=True, help="Log every step's numbers and each version's name to "
              "this tracker (repeatable; needs pip install 'nextstate[track]').")
@click.option("--track-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where trackers write their runs (default: <data dir>/runs).")
def learn(backends: tuple[str, ...], base_model: str, model_dir: Path | None, no_train: bool,
          store: str | None, backend_api_key: str | None, judge: str, judge_model: str | None,
          judge_api_base: str | None,
          method: str, batch_turns: int, learning_rate: float | None, teacher: str,
          personal_after: int | None, shard: bool, memory: bool, once: bool,
          metrics_port: int | None, metrics_host: str, track: tuple[str, ...],
          track_dir: Path | None) -> None:
    """Run the learner: judge recorded turns, train LoRA steps, publish adapters."""
    from dataclasses import replace

    require_learner_extra("nextstate learn")

    from nextstate.learner import ranks
    from nextstate.learner.config import MemoryConfig
    from nextstate.learner.process import Learner, LearnerConfig
    from nextstate.learner.training import TrainingConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    rank = ranks.start()
    if rank:  # launched as one of several: rank 0 is the learner, this one trains
        try:
            ranks.follow()
        finally:  # (a Ctrl-C met while waiting is raised once rank 0's stop has come)
            ranks.leave()
        return
    if model_dir is None and not no_train:
        from nextstate.learner.toy_model import ensure_toy_model

        model_dir = ensure_toy_model(data_dir())
    try:
        trainer = replace(TRAINER, method=method, batch_turns=batch_turns,
                          learning_rate=learning_rate, shard=shard)
        config = LearnerConfig(
            store_url=store or default_store_url(), backends=backends,
            backend_api_key=backend_api_key,
            base_model=base_model, model_dir=None if no_train else model_dir,
            adapters_dir=data_dir() / "adapters", judge=judge, judge_model=judge_model,
            judge_api_base=judge_api_base, teacher=teacher,
            training=TrainingConfig(trainer=trainer, personal_min_turns=personal_after),
            memory=MemoryConfig(learn=memory))
    except ValueError as exc:  # a combination the configuration refuses
        raise click.UsageError(str(exc)) from exc
    for url in config.backends:
        look_at_backend(url, backend_api_key, base_model,
                        then="The learner starts anyway and publishes there once it does.")

    observers = _observers(config, metrics_port, metrics_host, track,
                           track_dir or data_dir() / "runs")

    async def go() -> None:
        learner = Learner(config, observers=observers)
        try:
            await (learner.step() if once else learner.run())
        finally:
            await learner.close()

    from nextstate.learner.llm_judge import JudgeConfigError

    try:
        asyncio.run(go())
    except JudgeConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        ranks.stop()
        ranks.leave()


def _observers(config: LearnerConfig, metrics_port: int | None, metrics_host: str,
               track: tuple[str, ...], track_dir: Path) -> list[Any]:
    """The learner's metrics server and trackers, started before it runs (a tracker
    whose library is missing stops the command here, in one sentence)."""
    from nextstate.learner.metrics import LearnerMetrics
    from nextstate.learner.tracking import TrackingUnavailable, make_tracker, run_name

    observers: list[Any] = []
    if metrics_port is not None:
        metrics = LearnerMetrics()
        try:
            port = metrics.serve(metrics_port, metrics_host)
        except OSError as exc:
            raise click.ClickException(f"--metrics-port {metrics_port}: {exc}") from exc
        click.echo(f"learner metrics on http://{metrics_host}:{port}/metrics", err=True)
        observers.append(metrics)
    trainer = config.training.trainer
    settings = {"policy": config.policy or config.base_model, "base_model": config.base_model,
                "method": trainer.method, "batch_turns": trainer.batch_turns,
                "learning_rate": trainer.learning_rate, "lora_rank": trainer.lora_rank,
                "judge": config.judge, "teacher": config.teacher,
                "gate_max_kl": config.training.gate_max_kl,
                "personal_after": config.training.personal_min_turns}
    name = run_name(str(settings["policy"]))
    for kind in dict.fromkeys(track):
        try:
            observers.append(make_tracker(kind, track_dir, name, settings))  # type: ignore[arg-type]
        except TrackingUnavailable as exc:
            raise click.ClickException(f"--track {kind}: {exc}") from exc
        click.echo(f"tracking the steps with {kind} (run {name}, under {track_dir})", err=True)
    return observers


@click.command()
@store_option
def status(store: str | None) -> None:
    """What the learner is doing: state, counts, rewards, recent steps."""
    from nextstate.core.store import Store

    url = existing_store(store)
    db = Store(url)
    try:
        report = db.status.read()
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
    health = report.get("health") or {}
    lines = [
        *([f"health    {health['state']}" + (f": {'; '.join(health['why'])}"
                                             if health.get("why") else "")]
          if health else []),
        f"learner   {report.get('state', '?')} (reported {age:.0f}s ago, pid "
        f"{report.get('pid')}), judge {report.get('judge')}, method {report.get('method')}"
        + _ranks(report),
        f"serving   {adapter['name'] if adapter else 'the base model'}"
        + (f", published {_when(adapter['published_at'])}" if adapter else ""),
        f"next step [{bar}] {ready}/{batch} ready turns",
        *_personal_lines(report),
        *_memory_lines(report),
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


def _memory_lines(report: dict[str, Any]) -> list[str]:
    memory = report.get("memory") or {}
    counts = memory.get("counts") or {}
    if not memory.get("learning") and not any(counts.values()):
        return []
    lines = [f"memory    lessons: {counts.get('active', 0)} served, "
             f"{counts.get('retired', 0)} retired (the adapter follows them), "
             f"{counts.get('dropped', 0)} dropped (kept failing, or ignored), "
             f"{counts.get('pinned', 0)} pinned"]
    for event in [*(memory.get("retired") or [])[:2], *(memory.get("dropped") or [])[:2]]:
        lines.append(f"          {event['status']} {_when(event.get('status_at'))}: "
                     f"{event['text'][:60]!r}: {event.get('status_reason') or ''}")
    lines += [f"          not checked yet: {why}" for why in (memory.get("waiting") or [])[:2]]
    handed = memory.get("handed_over") or []
    for row in handed[:3]:
        lines.append(f"          handed over to the weights {_when(row.get('since'))}: "
                     f"{scope_label(row.get('tenant'), row.get('user'))}: {row.get('reason')}")
    more = int(memory.get("handed_over_count") or len(handed)) - len(handed[:3])
    if more > 0:
        lines.append(f"          and {more} more handed over")
    return lines


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


@click.group()
def adapters() -> None:
    """The adapter versions the learner published."""


@adapters.command("list")
@store_option
def list_adapters(store: str | None) -> None:
    """Every version: its state, when it was published, its step's numbers."""
    from nextstate.core.store import Store

    db = Store(existing_store(store))
    try:
        rows = db.adapters.versions()
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
@backend_option(multiple=True, required=True,
                help="URL of a vLLM server (repeatable: the version is loaded on each first).")
@backend_key_option
@store_option
def rollback(version: int, backends: tuple[str, ...], backend_api_key: str | None,
             store: str | None) -> None:
    """Serve VERSION again (loaded into every vLLM first, then made current)."""
    from nextstate.core import lora
    from nextstate.core.store import Store
    from nextstate.core.vllm import VLLMClient

    db = Store(existing_store(store))

    async def go() -> dict[str, Any]:
        vllms = [VLLMClient(url, backend_api_key) for url in backends]
        try:
            return await lora.rollback(db, vllms, version)
        finally:
            for vllm in vllms:
                await vllm.aclose()

    try:
        row = asyncio.run(go())
    except (lora.NoSuchVersion, lora.DirectoryGone, lora.NotLoaded) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        db.close()
    click.echo(f"{row['name']} is current again")
