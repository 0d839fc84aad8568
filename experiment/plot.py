"""The learning curves as a picture, like the paper's figure (benchmark -> PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {"combined": "#1b9e77", "opd": "#7570b3", "binary": "#d95f02"}


def plot_curves(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display here
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method, m in results["methods"].items():
        steps = list(range(len(m["mean"])))
        color = COLORS.get(method, "gray")
        # Past a stalled run's last step its score is carried forward: drawn dashed.
        stalled = [s for s in m.get("stalled_after", []) if s is not None]
        cut = min(stalled) + 1 if stalled else len(steps)
        ax.plot(steps[:cut], m["mean"][:cut], marker="o", color=color,
                label=f"{method} (nextstate)")
        if cut < len(steps):
            ax.plot(steps[cut - 1:], m["mean"][cut - 1:], linestyle="--", color=color,
                    label=f"{method}: no corrections left, carried")
        if len(results["seeds"]) > 1:
            ax.fill_between(steps, m["min"], m["max"], color=color, alpha=0.15)
        paper = results["paper"].get(method, {})
        if paper:
            xs = [int(k) for k in paper]
            ax.scatter(xs, list(paper.values()), marker="x", s=60, color=color,
                       label=f"{method} (paper)")
    ax.set_xlabel("training steps (16 judged turns each)")
    ax.set_ylabel("personalization score")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    seeds = len(results["seeds"])
    ax.set_title(f"Persona '{results['persona']}': score of the first reply to held-out "
                 f"problems\n(mean of {seeds} seed{'s' if seeds > 1 else ''}"
                 f"{', band: min-max' if seeds > 1 else ''})", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
