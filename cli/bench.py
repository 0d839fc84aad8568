"""Experiments and models for them: ``nextstate bench learning|personal|following``,
``nextstate demo`` (simulated users -> proxy -> vLLM -> learner, see nextstate.experiment)
and ``nextstate toy-model`` (the embedded model they run on). torch is imported inside
the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from nextstate.cli.options import require_learner_extra
from nextstate.core.paths import data_dir


@click.group()
def bench() -> None:
    """Benchmarks."""


@bench.command("learning")
@click.option("--personas", "personas_file", type=click.Path(exists=True, path_type=Path),
              default=None, help="A persona YAML file (default: the shipped student/teacher).")
@click.option("--persona", default="student", show_default=True)
@click.option("--method", default="all", show_default=True, metavar="ARMS",
              help="all, or some of binary, opd, combined, memory, memory+combined "
              "(comma-separated): the memory arms serve lessons (the second also distils "
              "and retires them).")
@click.option("--steps", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Repeat with seeds 0..N-1 and report the mean and spread.")
@click.option("--eval-problems", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--api", type=click.Choice(["chat", "messages"]), default="chat",
              show_default=True, help="How the simulated users talk: Chat Completions, or "
              "Anthropic Messages through the official SDK (as Claude Code does).")
@click.option("--teacher", type=click.Choice(["base", "policy"]), default="base",
              show_default=True, help="Distillation's teacher: the frozen base model shown "
              "the hint, or the adapter being trained shown the hint.")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="The trainer's learning rate [default: the trainer's, 1e-3].")
@click.option("--memory-lessons", type=click.IntRange(min=1), default=None, metavar="N",
              help="The memory arms: lessons a request gets at most [default: the proxy's, "
              "1].")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench/results/learning"),
              show_default=True)
def bench_learning(personas_file: Path | None, persona: str, method: str, steps: int,
                   seeds: int, eval_problems: int, api: str, teacher: str,
                   learning_rate: float | None, memory_lessons: int | None,
                   out: Path) -> None:
    """Simulated users -> proxy -> vLLM -> learner: the learning curve of each method."""
    require_learner_extra("nextstate bench learning")
    from nextstate.experiment.bench import run_benchmark
    from nextstate.experiment.run import MEMORY_ARMS, METHODS, BenchConfig

    chosen = _persona(personas_file, persona)
    arms = (*METHODS, *MEMORY_ARMS)
    methods = arms if method == "all" else tuple(m.strip() for m in method.split(","))
    unknown = [m for m in methods if m not in arms]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}: choose from all, "
                                 f"{', '.join(arms)}", param_hint="--method")
    config = BenchConfig(  # click's choices arrive as str, not the config's Literals
        steps=steps, eval_problems=eval_problems, api=api, teacher=teacher,  # type: ignore[arg-type]
        learning_rate=learning_rate, memory_lessons=memory_lessons)
    results = run_benchmark(chosen, methods, config, out, seeds=range(seeds),
                            progress=lambda m: click.echo(m, err=True))
    click.echo((out / "results.md").read_text())
    click.echo(f"results: {out / 'results.json'}\nplot:    {out / 'learning_curves.png'} "
               f"({results['wall_seconds'] / 60:.1f} min)")


@bench.command("following")
@click.option("--count", type=click.IntRange(min=0), default=400, show_default=True,
              help="Probes per wording and form (0: not).")
@click.option("--per-template", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also ask each template of the grammar alone, this many probes each "
                   "(0: not).")
@click.option("--tone-words", is_flag=True,
              help="Also read, exactly and without a server, how formal the reply is to "
                   "each tone word asked for and negated (\"Be chill.\", \"Too chill.\").")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench/results/following"),
              show_default=True)
def bench_following(count: int, per_template: int, tone_words: bool, out: Path) -> None:
    """How often the hint-following toy model, served by vLLM, does what an instruction
    asks, per attribute, for train and held-out wordings (and per template, and per tone
    word)."""
    import json

    from nextstate.experiment import following
    from nextstate.experiment.bench import BASE_MODEL, serving_trained_toy, trained_toy_model

    def save(name: str, data: object, table: str) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(data, indent=2))
        (out / f"{name}.md").write_text(table)
        click.echo(table)

    if not (count or per_template or tone_words):
        raise click.UsageError("nothing to measure: give --count, --per-template or "
                               "--tone-words")
    def progress(message: str) -> None:
        click.echo(message, err=True)

    if count or per_template:
        with serving_trained_toy(out, progress) as (vllm, _model_dir):
            generate = following.vllm_generator(vllm.url, BASE_MODEL)
            results = following.measure(generate, count=count) if count else None
            templates = following.by_template(generate, per_template) if per_template \
                else None
        if results is not None:
            save("following", results, following.markdown(results))
        if templates is not None:
            save("following_templates", templates, following.template_markdown(templates))
    if tone_words:
        require_learner_extra("nextstate bench following --tone-words")
        rows = following.tone_words(trained_toy_model(progress))
        save("following_tone_words", rows, following.tone_words_markdown(rows))


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
    from nextstate.experiment.personal import run_personal_benchmark
    from nextstate.experiment.run import BenchConfig

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
    from nextstate.experiment.bench import run_benchmark
    from nextstate.experiment.run import BenchConfig

    chosen = _persona(None, persona)
    out = out or data_dir() / "demo"
    click.echo(f"persona {chosen.name}: prefers "
               + ", ".join(f"{k} {v}" for k, v in chosen.prefers.items()), err=True)
    run_benchmark(chosen, ("combined",), BenchConfig(steps=steps), out,
                  progress=lambda m: click.echo(m, err=True))
    click.echo((out / "results.md").read_text())
    click.echo(f"plot: {out / 'learning_curves.png'}")


def _persona(path: Path | None, name: str) -> Any:
    from nextstate.experiment.personas import PersonaError, load_personas

    try:
        personas = load_personas(path)
    except PersonaError as exc:
        raise click.ClickException(str(exc)) from exc
    if name not in personas:
        raise click.ClickException(f"no persona {name!r}; have: {', '.join(personas)}")
    return personas[name]


@click.command("toy-model")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Build into this directory instead of the cache.")
@click.option("--trained", is_flag=True,
              help="The hint-following model of the learning benchmark (pretrained from "
                   "scratch: ~8 minutes on 2 cores, then cached).")
@click.option("--vision", is_flag=True,
              help="The vision-language toy (a tiny Idefics3 with random weights) that vLLM "
                   "serves with images; see docs/vlm-on-cpu.md.")
def toy_model(out: Path | None, trained: bool, vision: bool) -> None:
    """Build the embedded toy model (cached in the data dir) and print its path."""
    if trained and vision:
        raise click.UsageError("--trained and --vision are two different models; pick one")
    try:
        from nextstate.experiment.pretrain import TRAINED_TOY
        from nextstate.learner.toy_model import ToyModelRecipe, build_toy_model, ensure_toy_model
        from nextstate.learner.vlm_toy_model import build_vlm_toy_model, ensure_vlm_toy_model
    except ImportError as exc:  # the proxy-only install has no torch
        raise click.ClickException(
            f"building the toy model needs the learner extra ({exc}); "
            "pip install 'nextstate[learner]'") from exc
    def progress(message: str) -> None:
        click.echo(message, err=True)

    if vision:
        built = ensure_vlm_toy_model(data_dir(), progress=progress) if out is None \
            else build_vlm_toy_model(out, progress=progress)
        click.echo(str(built))
        return
    recipe = TRAINED_TOY if trained else ToyModelRecipe()
    if out is None:
        click.echo(str(ensure_toy_model(data_dir(), recipe, progress=progress)))
    else:
        click.echo(str(build_toy_model(out, recipe, progress=progress)))
