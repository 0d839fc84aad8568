"""The rules judge on a labelled set of free-form replies (learner.rules): precision and
recall of its -1 and +1 verdicts, and a hint on every correction it catches.

The set (`rules_labelled.py`) is a test set: the judge's cues were never tuned on it.
The figures are reported in bench/README.md; these floors keep them from sliding back.
"""

from __future__ import annotations

from typing import Any

from nextstate.learner.rules import RulesJudge
from tests.learner.rules_labelled import CONTEXTS, LABELLED


def turn(context: str, said: str) -> dict[str, Any]:
    asked, replied = CONTEXTS[context]
    return {"request": {"messages": [{"role": "user", "content": asked}]},
            "response": {"choices": [{"message": {"role": "assistant", "content": replied}}]},
            "next_state": [{"role": "user", "content": said}], "next_state_status": "paired",
            "feedback": []}


def scores(judge: RulesJudge) -> dict[str, float]:
    """Precision and recall of -1 and +1, and the share of caught corrections with a
    hint."""
    verdicts = [(label, judge.judge_now(turn(context, said)))
                for label, context, said in LABELLED]
    out: dict[str, float] = {}
    for cls in (-1, 1):
        said = [label for label, j in verdicts if j.score == cls]
        out[f"precision {cls:+d}"] = sum(label == cls for label in said) / max(1, len(said))
        out[f"recall {cls:+d}"] = (sum(j.score == cls for label, j in verdicts if label == cls)
                                   / sum(label == cls for label, _ in verdicts))
    caught = [j for label, j in verdicts if label == -1 and j.score == -1]
    out["hinted"] = sum(bool(j.hints) for j in caught) / max(1, len(caught))
    return out


def test_the_labelled_set_is_large_and_covers_every_label() -> None:
    assert len(LABELLED) >= 200
    assert {label for label, _, _ in LABELLED} == {-1, 0, 1}
    assert len({said for _, _, said in LABELLED}) == len(LABELLED)  # no duplicates


def test_the_judge_finds_corrections_and_approval_in_free_form_replies() -> None:
    found = scores(RulesJudge())
    print(found)
    assert found["precision -1"] >= 0.9 and found["recall -1"] >= 0.85, found
    assert found["precision +1"] >= 0.85 and found["recall +1"] >= 0.85, found
    assert found["hinted"] == 1.0, found
