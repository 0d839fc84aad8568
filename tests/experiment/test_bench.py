"""What the learning benchmark writes: means over seeds, the table beside the paper's
numbers, the plot (runs -> results.json / results.md / PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nextstate.experiment.bench import PAPER, markdown_table
from nextstate.experiment.plot import plot_curves
from nextstate.experiment.run import MethodRun, summarise


def runs() -> list[MethodRun]:
    return [MethodRun("combined", 0, scores=[0.2, 0.5, 0.9], seconds=60),
            MethodRun("combined", 1, scores=[0.3, 0.4, 0.7], seconds=30),
            MethodRun("binary", 0, scores=[0.2, 0.2, 0.3], seconds=45),
            MethodRun("binary", 1, scores=[0.3, 0.2, 0.2], seconds=45)]


def results(seeds: int = 2) -> dict[str, Any]:
    chosen = [r for r in runs() if r.seed < seeds]
    return {"persona": "student", "seeds": list(range(seeds)), "methods": summarise(chosen),
            "paper": PAPER}


def test_summarise_takes_mean_and_spread_per_step_over_seeds() -> None:
    summary = summarise(runs())
    assert list(summary) == ["combined", "binary"]
    assert summary["combined"]["mean"] == pytest.approx([0.25, 0.45, 0.8])
    assert summary["combined"]["min"] == [0.2, 0.4, 0.7]
    assert summary["combined"]["max"] == [0.3, 0.5, 0.9]
    assert summary["combined"]["seconds"] == 90
    assert [s["seed"] for s in summary["binary"]["seeds"]] == [0, 1]


def test_the_table_has_a_row_per_method_with_the_papers_numbers_beside() -> None:
    table = markdown_table(results()).splitlines()
    assert table[0] == "| method | step 0 | step 2 | paper | time |"
    assert table[2] == ("| combined | 0.25 (0.20-0.30) | 0.80 (0.70-0.90) | "
                        "0.17 @0, 0.76 @8, 0.81 @16 | 1.5 min |")
    assert table[3].startswith("| binary | 0.25 (0.20-0.30) | 0.25 (0.20-0.30) | 0.25 @8 |")


def test_one_seed_has_no_spread_and_long_runs_mark_steps_4_and_8() -> None:
    long = MethodRun("opd", 0, scores=[i / 16 for i in range(17)], seconds=120)
    table = markdown_table({"seeds": [0], "methods": summarise([long]), "paper": PAPER})
    head, _, row = table.splitlines()
    assert head == "| method | step 0 | step 4 | step 8 | step 16 | paper | time |"
    assert row == "| opd | 0.00 | 0.25 | 0.50 | 1.00 | 0.25 @8, 0.72 @16 | 2.0 min |"


def test_the_plot_is_a_png(tmp_path: Path) -> None:
    path = plot_curves(results(), tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000  # axes, two curves, the paper's marks


def test_a_stalled_run_carries_its_last_score_and_says_so(tmp_path: Path) -> None:
    stalled = MethodRun("opd", 0, scores=[0.2, 0.9, 1.0], stalled_after=2)
    summary = summarise([stalled, MethodRun("opd", 1, scores=[0.3, 0.5, 0.7, 0.8, 0.9])],
                        steps=4)
    assert summary["opd"]["mean"] == pytest.approx([0.25, 0.7, 0.85, 0.9, 0.95])
    assert summary["opd"]["stalled_after"] == [2, None]
    results = {"persona": "student", "seeds": [0, 1], "methods": summary, "paper": PAPER}
    assert "opd: no step after step 2 in some seed" in markdown_table(results)
    assert plot_curves(results, tmp_path / "stalled.png").exists()


def test_the_table_says_how_often_each_preference_was_met_at_the_last_step() -> None:
    met = [{"tone": 0.5, "steps": 0.25}, {"tone": 0.75, "steps": 1.0}]
    done = [MethodRun("combined", seed, scores=[0.2, 0.8], met=[{}, m], seconds=60)
            for seed, m in enumerate(met)]
    summary = summarise(done)
    assert summary["combined"]["met_at_end"] == {"tone": 0.625, "steps": 0.625}
    table = markdown_table({"seeds": [0, 1], "methods": summary, "paper": PAPER,
                            "prefers": {"tone": "casual", "steps": "shown"}})
    assert ("Preferences met at step 1:\n\n| method | tone: casual | steps: shown |\n"
            "|---|---|---|\n| combined | 0.62 | 0.62 |") in table


def memory_run(seed: int, retired: list[int], tokens: list[float]) -> MethodRun:
    return MethodRun(
        "memory+combined", seed, scores=[0.2, 0.95, 0.97], seconds=60,
        early={"2": 0.9 + seed / 100, "4": 0.95},
        lessons=[{"active": 3 - r, "retired": r, "dropped": 0, "pinned": 0,
                  "handed_over": int(r == 3 and seed == 0)} for r in retired],
        injected=[{"mean": t, "served": 1.0 if t else 0.0, "requests": 20.0} for t in tokens],
        weights_only=[0.4, 0.9])


def test_memory_arms_report_the_first_problems_the_lessons_and_their_cost(
        tmp_path: Path) -> None:
    summary = summarise([memory_run(0, [0, 3], [100.0, 0.0]),
                         memory_run(1, [1, 3], [110.0, 20.0]), *runs()[:1]])
    memory = summary["memory+combined"]
    assert memory["early"] == {"2": pytest.approx(0.905), "4": pytest.approx(0.95)}
    assert memory["memory"]["retired"] == [0.5, 3.0]
    assert memory["memory"]["injected_tokens"] == [105.0, 10.0]
    assert memory["memory"]["weights_only"] == [0.4, 0.9]
    assert memory["memory"]["handed_over"] == [0.0, 0.5]  # one seed of two, after step 2
    assert "memory" not in summary["combined"]
    result = {"persona": "student", "seeds": [0, 1], "methods": summary, "paper": PAPER}
    table = markdown_table(result).splitlines()
    assert table[0] == "| method | step 0 | 2 problems | 4 problems | step 2 | paper | time |"
    assert table[2].startswith("| memory+combined | 0.20 (0.20-0.20) | 0.91 | 0.95 | 0.97")
    assert table[3].startswith("| combined | 0.20 (0.20-0.20) | - | - |")
    assert "| 2 | 0.0 | 3.0 | 0.0 | 10.0 | 0.50 | 0.5 | 0.90 |" in table
    assert plot_curves(result, tmp_path / "memory.png").stat().st_size > 10_000


def test_arms_name_their_training_method_and_memory() -> None:
    from nextstate.experiment.memory import arm

    assert (arm("memory").method, arm("memory").memory) == (None, True)
    assert (arm("memory+combined").method, arm("memory+combined").trains) == ("combined", True)
    assert (arm("opd").method, arm("opd").memory) == ("opd", False)
