"""The shared-vs-personal benchmark's summary, table and plot (the run itself needs vLLM:
``nextstate bench personal``)."""

from __future__ import annotations

from nextstate.experiment.personal import (
    ModeRun,
    markdown_table,
    plot_personal,
    summarise,
)


def runs() -> list[ModeRun]:
    shared = [["p@000001", "p@000002"], ["p@000003", "p@000004"]]
    personal = [["p~student@000001", "p~teacher@000002"],
                ["p~student@000003", "p~student@000004", "p~teacher@000005"]]
    tone = [{"tone": 0.5}, {"tone": 0.6}, {"tone": 0.75}]
    runs = [
        ModeRun("shared", 0, {"student": [0.2, 0.3, 0.4], "teacher": [0.5, 0.5, 0.6]},
                shared),
        ModeRun("shared", 1, {"student": [0.2, 0.5, 0.6], "teacher": [0.5, 0.7, 0.6]},
                shared),
        ModeRun("personal", 0, {"student": [0.2, 0.6, 0.9], "teacher": [0.5, 0.8, 1.0]},
                personal),
        ModeRun("personal", 1, {"student": [0.2, 0.6, 0.7], "teacher": [0.5, 0.6, 0.8]},
                personal),
    ]
    for run in runs:
        run.attributes = {"student": tone, "teacher": tone}
    return runs


def results(seeds: list[int]) -> dict:
    return {"personas": {"student": {"tone": "casual"}, "teacher": {"tone": "formal"}},
            "seeds": seeds,
            "config": {"batch_turns": 16}, "optimizer_steps_per_step": 2,
            "modes": summarise([r for r in runs() if r.seed in seeds], ["student", "teacher"])}


def test_scores_are_summarised_per_mode_and_persona_over_seeds():
    modes = summarise(runs(), ["student", "teacher"])
    assert modes["shared"]["student"]["mean"] == [0.2, 0.4, 0.5]
    assert modes["personal"]["teacher"]["min"] == [0.5, 0.6, 0.8]
    assert modes["personal"]["teacher"]["max"] == [0.5, 0.8, 1.0]
    # how many optimizer steps shaped the adapter that served each persona
    assert modes["shared"]["student"]["adapter_steps"] == 4
    assert modes["personal"]["student"]["adapter_steps"] == 3
    assert modes["personal"]["teacher"]["adapter_steps"] == 2


def test_the_table_sets_each_personas_shared_and_personal_scores_side_by_side():
    table = markdown_table(results([0])).split("\n\n")[0].splitlines()
    assert table[0] == "| persona | adapter | step 0 | step 2 | its optimizer steps |"
    assert table[2:] == ["| student | shared | 0.20 | 0.40 | 4 |",
                         "| student | personal | 0.20 | 0.90 | 3 |",
                         "| teacher | shared | 0.50 | 0.60 | 4 |",
                         "| teacher | personal | 0.50 | 1.00 | 2 |",
                         "| both (mean) | shared | 0.35 | 0.50 |  |",
                         "| both (mean) | personal | 0.35 | 0.95 |  |"]
    assert "(0.40-0.60)" in markdown_table(results([0, 1]))  # the spread over seeds


def test_the_report_shows_which_preferences_each_adapter_meets():
    report = markdown_table(results([0]))
    assert "Preferences met at step 2:" in report
    assert "| student | tone: casual |\n|---|---|\n| shared | 0.75 |\n| personal | 0.75 |" \
        in report


def test_the_plot_is_written(tmp_path):
    path = plot_personal(results([0, 1]), tmp_path / "p.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
