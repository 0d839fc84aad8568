"""``nextstate bench learning`` and ``nextstate demo``: run the learning benchmark end to
end and write what it found (results.json, learning_curves.png, a markdown table).

It starts its own vLLM with the hint-following toy model (built and cached on first use,
a few minutes) and runs every requested method and seed against it, each with its own
store, policy name and adapters (simulated user -> proxy -> vLLM -> learner -> vLLM).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import platform
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from nextstate.core.paths import data_dir
from nextstate.core.vllm_server import VLLMProcess, toy_model_config
from nextstate.experiment.personas import Persona
from nextstate.experiment.plot import plot_curves
from nextstate.experiment.run import BenchConfig, MethodRun, Progress, run_method, summarise

BASE_MODEL = "nextstate-toy-trained"
# The paper's Figure (OpenClaw-RL, simulated student): personalization score by step.
PAPER = {"combined": {"0": 0.17, "8": 0.76, "16": 0.81},
         "binary": {"8": 0.25}, "opd": {"8": 0.25, "16": 0.72}}


def trained_toy_model(progress: Progress) -> Path:
    from nextstate.experiment.pretrain import TRAINED_TOY
    from nextstate.learner.toy_model import ensure_toy_model

    return ensure_toy_model(data_dir(), TRAINED_TOY, progress=progress)


@contextmanager
def serving_trained_toy(out: Path, progress: Progress) -> Iterator[tuple[VLLMProcess, Path]]:
    """A vLLM serving the hint-following toy model (built first if needed), logging into
    ``out``; yields it and the model's directory (the trainer's base)."""
    out.mkdir(parents=True, exist_ok=True)
    model_dir = trained_toy_model(progress)
    vllm_config = toy_model_config(model_dir, BASE_MODEL, log_path=out / "vllm.log",
                                   max_loras=4)
    progress(f"starting vLLM with {model_dir.name} (log: {out / 'vllm.log'})")
    with VLLMProcess(vllm_config) as vllm:
        yield vllm, model_dir


def run_benchmark(persona: Persona, methods: Sequence[str], config: BenchConfig, out: Path,
                  seeds: Sequence[int] = (0,), progress: Progress = print) -> dict[str, Any]:
    started = time.monotonic()
    runs: list[MethodRun] = []
    results: dict[str, Any] = {}
    with serving_trained_toy(out, progress) as (vllm, model_dir):
        for seed in seeds:
            for method in methods:
                runs.append(asyncio.run(run_method(
                    persona, method, replace(config, seed=seed), vllm_url=vllm.url,
                    base_model=BASE_MODEL, model_dir=model_dir, workdir=out / "work",
                    progress=progress)))
                # Written after every run: a failure later leaves the finished ones.
                results = write_results(persona, config, seeds, runs, out,
                                        time.monotonic() - started)
    return results


def write_results(persona: Persona, config: BenchConfig, seeds: Sequence[int],
                  runs: list[MethodRun], out: Path, seconds: float) -> dict[str, Any]:
    results = {
        "persona": persona.name, "prefers": persona.prefers,
        "config": asdict(config), "seeds": list(seeds),
        "methods": summarise(runs, config.steps),
        "base_score": sum(r.scores[0] for r in runs) / len(runs),
        "wall_seconds": seconds,
        "paper": PAPER,
        # Requests the simulated users sent again after a transient failure, by cause.
        "retries": dict(sum((Counter(r.retries) for r in runs), Counter())),
    }
    return save_results(out, results, plot_curves, "learning_curves.png", markdown_table)


def save_results(out: Path, results: dict[str, Any],
                 plot: Callable[[dict[str, Any], Path], Any], plot_name: str,
                 table: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """``results`` stamped with the date and the machine, as results.json, a plot and a
    markdown table (results.md) in ``out`` (both benchmarks)."""
    results = {**results, "date": datetime.date.today().isoformat(),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                          f"{platform.python_version()}"}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out / plot_name)
    (out / "results.md").write_text(table(results))
    return results


def markdown_table(results: dict[str, Any]) -> str:
    """Score at each step per method (and after the first problems), with the paper's
    numbers beside ours; then what the memory arms' lessons did."""
    methods = results["methods"]
    steps = len(next(iter(methods.values()))["mean"]) - 1
    marks = sorted({0, min(4, steps), min(8, steps), steps})
    early = list(dict.fromkeys(k for m in methods.values() for k in m.get("early", {})))
    head = ("| method | step 0 | " + " | ".join(f"{k} problems" for k in early)
            + (" | " if early else "") + " | ".join(f"step {s}" for s in marks[1:])
            + " | paper | time |")
    lines = [head, "|" + "---|" * (len(marks) + len(early) + 3)]
    for name, m in methods.items():
        paper = ", ".join(f"{v:.2f} @{k}" for k, v in results["paper"].get(name, {}).items())
        cells = []
        for s in marks:
            spread = (f" ({m['min'][s]:.2f}-{m['max'][s]:.2f})"
                      if len(results["seeds"]) > 1 else "")
            cells.append(f"{m['mean'][s]:.2f}{spread}")
        found = m.get("early", {})
        cells[1:1] = [f"{found[k]:.2f}" if k in found else "-" for k in early]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {paper} | "
                     f"{m['seconds'] / 60:.1f} min |")
    lines += preferences_table(results, steps)
    lines += memory_table(methods)
    notes = [f"{name}: no step after step {min(s for s in m['stalled_after'] if s is not None)}"
             " in some seed (the persona stopped correcting, so nothing was left to learn "
             "from); its last score is carried forward"
             for name, m in methods.items()
             if any(s is not None for s in m.get("stalled_after", []))]
    if results.get("config", {}).get("api") == "messages":
        notes.append("the simulated users talked over the Anthropic Messages API, through "
                     "the official SDK (evaluation asks the chat route, recording off; the "
                     "SDK retries transient failures itself, uncounted)")
    if "retries" in results:  # (transient failures, see client.py)
        notes.append("the simulated users retried " + (", ".join(
            f"{n} requests after {cause}" for cause, n in results["retries"].items())
            or "no request"))
    for name, m in methods.items():
        kls = [f"{r['kl']:.2f}" for seed in m["seeds"] for r in seed.get("refused", [])]
        slowed = [f"{r['kl_first_try']:.2f} -> {r['kl']:.2f} at {r['lr_scale']:g}x"
                  for seed in m["seeds"] for r in seed.get("slowed", [])]
        if slowed:
            notes.append(f"{name}: {len(slowed)} step(s) over the publish gate's bound were "
                         f"taken again at a smaller learning rate (KL {', '.join(slowed)})")
        if kls:
            notes.append(f"{name}: the publish gate refused {len(kls)} step(s) over "
                         f"{len(m['seeds'])} seed(s) (KL at the smallest rate tried "
                         f"{', '.join(kls)} nats/token); their turns were skipped and the "
                         "traffic went on")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def preferences_table(results: dict[str, Any], steps: int) -> list[str]:
    """How often each of the persona's preferences was met at the last step, per method:
    which preference a method leaves behind."""
    prefers = results.get("prefers") or {}
    methods = {name: m.get("met_at_end") for name, m in results["methods"].items()}
    if not prefers or not any(methods.values()):
        return []
    lines = ["", f"Preferences met at step {steps}:", "",
             "| method | " + " | ".join(f"{a}: {v}" for a, v in prefers.items()) + " |",
             "|" + "---|" * (len(prefers) + 1)]
    for name, met in methods.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{met[a]:.2f}" if met and a in met else "-" for a in prefers) + " |")
    return lines


def memory_table(methods: dict[str, Any]) -> list[str]:
    """Per step, for each memory arm: lessons served, retired and dropped, the prompt
    tokens lessons added a request, and the adapter's score with the memory off."""
    lines: list[str] = []
    for name, m in methods.items():
        memory = m.get("memory")
        if not memory:
            continue
        lines += ["", f"{name}: | step | lessons served | retired | dropped | tokens of "
                      "lessons a request | requests served with lessons | handed over "
                      "| the adapter alone |", "|---|---|---|---|---|---|---|---|"]
        alone = memory.get("weights_only") or []
        handed = memory.get("handed_over") or [0.0] * len(memory["injected_tokens"])
        for i, tokens in enumerate(memory["injected_tokens"]):
            lines.append(f"| {i + 1} | {memory['active'][i]:.1f} | {memory['retired'][i]:.1f} "
                         f"| {memory['dropped'][i]:.1f} | {tokens:.1f} | "
                         f"{memory['served_share'][i]:.2f} | {handed[i]:.1f} | "
                         f"{f'{alone[i]:.2f}' if i < len(alone) else '-'} |")
    return lines
