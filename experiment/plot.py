"""The learning curves as a picture, like the paper's figure (benchmark -> PNG); with
memory arms, a second panel: what the lessons cost a request, and how many were retired.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {"combined": "#1b9e77", "opd": "#7570b3", "binary": "#d95f02",
          "memory": "#e7298a", "memory+combined": "#66a61e"}
# Where the scores after the first problems go on the step axis: a problem is about two
# judged turns, a step 16.
EARLY_AT = {"2": 0.25, "4": 0.5}


def plot_curves(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display here
    import matplotlib.pyplot as plt

    memory = {n: m["memory"] for n, m in results["methods"].items() if m.get("memory")}
    fig, axes = plt.subplots(1, 2 if memory else 1, figsize=(13 if memory else 7, 4.5),
                             dpi=120, squeeze=False)
    ax = axes[0][0]
    for method, m in results["methods"].items():
        steps = list(range(len(m["mean"])))
        color = COLORS.get(method, "gray")
        # Past a stalled run's last step its score is carried forward: drawn dashed.
        stalled = [s for s in m.get("stalled_after", []) if s is not None]
        cut = min(stalled) + 1 if stalled else len(steps)
        early = [(EARLY_AT[k], v) for k, v in m.get("early", {}).items() if k in EARLY_AT]
        xs = [0.0, *(x for x, _ in early), *steps[1:cut]]
        ys = [m["mean"][0], *(y for _, y in early), *m["mean"][1:cut]]
        ax.plot(xs, ys, marker="o", color=color, label=f"{method} (nextstate)")
        if cut < len(steps):
            ax.plot(steps[cut - 1:], m["mean"][cut - 1:], linestyle="--", color=color,
                    label=f"{method}: no corrections left, carried")
        if len(results["seeds"]) > 1:
            ax.fill_between(steps, m["min"], m["max"], color=color, alpha=0.15)
        alone = (m.get("memory") or {}).get("weights_only") or []
        if alone:
            ax.plot(steps[1:len(alone) + 1], alone, linestyle=":", marker=".", color=color,
                    label=f"{method}: the adapter alone (memory off)")
        paper = results["paper"].get(method, {})
        if paper:
            ax.scatter([int(k) for k in paper], list(paper.values()), marker="x", s=60,
                       color=color, label=f"{method} (paper)")
    ax.set_xlabel("training steps (16 judged turns each; first points: after 2 and 4 "
                  "problems)", fontsize=8)
    ax.set_ylabel("personalization score")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    seeds = len(results["seeds"])
    ax.set_title(f"Persona '{results['persona']}': score of the first reply to held-out "
                 f"problems\n(mean of {seeds} seed{'s' if seeds > 1 else ''}"
                 f"{', band: min-max' if seeds > 1 else ''})", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    if memory:
        _memory_panel(axes[0][1], memory)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _memory_panel(ax: Any, memory: dict[str, dict[str, Any]]) -> None:
    twin = ax.twinx()
    for method, m in memory.items():
        color = COLORS.get(method, "gray")
        steps = list(range(1, len(m["injected_tokens"]) + 1))
        ax.plot(steps, m["injected_tokens"], marker="o", color=color,
                label=f"{method}: tokens of lessons a request")
        twin.plot(steps, m["retired"], marker="s", linestyle="--", color=color,
                  label=f"{method}: lessons retired")
        twin.plot(steps, m["active"], marker="^", linestyle=":", color=color,
                  label=f"{method}: lessons still served")
    ax.set_xlabel("training steps")
    ax.set_ylabel("prompt tokens the lessons added, mean a request")
    twin.set_ylabel("lessons retired (the adapter follows them) / still served")
    ax.set_ylim(bottom=0)
    twin.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title("The memory hands over to the weights", fontsize=10)
    handles = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, loc="upper right")
