"""Measuring hint following (learner.experiment.following): probes per wording and form,
and the tally of what replies showed against what was asked."""

from __future__ import annotations

import random

import pytest

from nextstate.experiment import following as F
from nextstate.experiment import wording
from nextstate.experiment.styles import make_problem, make_reply
from nextstate.learner.teacher import HINT_MARKER


def test_probes_are_reproducible_and_carry_their_instruction_in_the_form_asked() -> None:
    assert F.probes("held-out", "hint", 20) == F.probes("held-out", "hint", 20)
    held = wording.vocabulary("held-out")
    for probe in F.probes("held-out", "hint", 50):
        question, hint = probe.messages[-1]["content"].split(HINT_MARKER)
        assert probe.prefs and wording.content_words(hint) & held
        assert not wording.content_words(question) & held
    for probe in F.probes("train", "natural", 50):
        assert HINT_MARKER not in probe.messages[-1]["content"] and probe.prefs
    assert all(not p.prefs for p in F.probes("train", "none", 10))
    with pytest.raises(ValueError, match="unknown form"):
        F.probes("train", "shouted", 1)


def test_the_tally_counts_a_value_only_where_it_was_asked() -> None:
    rng = random.Random(0)
    asked = [F.Probe([], {"tone": "casual", "steps": "shown"}), F.Probe([], {"tone": "casual"})]
    replies = [make_reply(make_problem(rng), {"tone": "casual", "steps": "answer-only"}, rng),
               make_reply(make_problem(rng), {"tone": "formal"}, rng)]
    counts = F.tally(replies, asked)
    assert counts["tone=casual"] == [1, 2] and counts["steps=shown"] == [0, 1]
    assert counts["tone=formal"] == [0, 0] and counts["closing=none"] == [0, 0]
    assert F.rates(counts)["tone=casual"] == 0.5 and "tone=formal" not in F.rates(counts)
    # A probe asking nothing counts toward every value: the share of replies showing it.
    plain = F.tally([make_reply(make_problem(rng), {}, rng)], [F.Probe([], {})])
    assert plain["tone=formal"] == [1, 1] and plain["closing=encouragement"] == [0, 1]


def test_measure_asks_each_wording_and_form_and_tables_them() -> None:
    seen: list[int] = []

    def generate(conversations: list[F.Messages]) -> list[str]:
        seen.append(len(conversations))
        return ["Hey! So it's 4, easy!"] * len(conversations)  # casual, nothing else

    results = F.measure(generate, count=10)
    assert set(results) == {"train", "held-out"}
    assert set(results["train"]) == {"none", "hint", "natural"}
    assert set(results["held-out"]) == {"hint", "natural"}
    assert seen == [10] * 5
    table = F.markdown(results)
    assert "| (no instruction) | none |" in table and "| held-out | hint |" in table
    assert F.rates(results["held-out"]["hint"])["tone=casual"] == 1.0


def test_each_template_is_asked_alone_and_rated_for_the_value_it_asks_for() -> None:
    hints: list[str] = []

    def generate(conversations: list[F.Messages]) -> list[str]:
        rng = random.Random(0)
        out = []
        for messages in conversations:  # a reader of words: "too" means casual, to it
            hint = messages[-1]["content"].split(HINT_MARKER)[1]
            hints.append(hint)
            tone = "casual" if "too" in hint.split() else "formal"
            out.append(make_reply(make_problem(rng), {"tone": tone}, rng))
        return out

    rows = F.by_template(generate, count=3)
    assert len(rows) == sum(len(asks[s]) for asks in wording.ASKS.values()
                            for s in wording.SPLITS)
    assert len(hints) == 3 * len(rows) and all(r["asked"] == 3 for r in rows)
    rate = {(r["value"], r["split"], r["template"]): r["hits"] / r["asked"] for r in rows}
    assert rate[("casual", "train", "too {formal}")] == 1.0
    assert rate[("formal", "train", "too {casual}")] == 0.0  # misread, and shown so
    assert rate[("formal", "train", "be {formal}")] == 1.0
    held = wording.vocabulary("held-out")
    for row, i in zip(rows, range(0, len(hints), 3), strict=True):  # each in its own words
        words = set().union(*(wording.content_words(h) for h in hints[i:i + 3]))
        if row["split"] == "train":
            assert not words & held
        elif "{" in row["template"]:
            assert words & held
    table = F.template_markdown(rows)
    assert "| tone | formal | train | too {casual} | 0.00 |" in table
