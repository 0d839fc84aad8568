"""The experiment's vocabulary: problems, styled replies, detectors, instruction wordings."""

from __future__ import annotations

import itertools
import random
import re

import pytest

from nextstate.experiment.styles import (
    ATTRIBUTES,
    DEFAULT_RATE,
    DEFAULTS,
    PHRASES,
    detect,
    instruction,
    make_problem,
    make_reply,
    random_prefs,
    sample_attrs,
    score,
)

COMBINATIONS = [dict(zip(ATTRIBUTES, values, strict=True))
                for values in itertools.product(*ATTRIBUTES.values())]


def test_defaults_are_the_first_value_of_each_attribute() -> None:
    assert DEFAULTS == {"tone": "formal", "steps": "answer-only", "length": "brief",
                        "closing": "none"}
    assert DEFAULT_RATE == 0.75
    assert len(COMBINATIONS) == 16


@pytest.mark.parametrize("attribute", list(ATTRIBUTES))
def test_each_detector_reads_its_attribute_on_all_16_combinations(attribute: str) -> None:
    rng = random.Random(attribute)
    for attrs in COMBINATIONS:
        for _ in range(40):  # enough draws to use every template of every value
            reply = make_reply(make_problem(rng), attrs, rng)
            assert detect(reply)[attribute] == attrs[attribute], (attrs, reply)


@pytest.mark.parametrize("text", [
    "", "   ", "asdf qwerty zxcv", "12345", "The sky is blue.", "Stepping stones: 3",
    "They said it was breezy and nice workarounds exist.",  # no marker inside other words
])
def test_text_without_markers_reads_as_all_defaults(text: str) -> None:
    assert detect(text) == DEFAULTS


def test_detector_edge_cases() -> None:
    assert detect("Hey! Certainly.")["tone"] == "formal"  # a tie reads as the default
    assert detect("Hey! So it's 4, easy!")["tone"] == "casual"
    assert detect("step 3: add them")["steps"] == "shown"  # any case, any step number
    assert detect("Do it in one step: add them.")["steps"] == "answer-only"  # not a step line
    assert detect("You\u2019ve got this!")["closing"] == "encouragement"  # curly apostrophe
    assert detect("TO DOUBLE-CHECK, recount.")["length"] == "detailed"


def test_score_is_the_fraction_of_preferences_matched() -> None:
    rng = random.Random(0)
    reply = make_reply(make_problem(rng), {"tone": "casual", "steps": "shown"}, rng)
    assert score(reply, {"tone": "casual"}) == 1.0
    assert score(reply, {"tone": "formal"}) == 0.0
    assert score(reply, {"tone": "casual", "steps": "answer-only"}) == 0.5
    everything = {"tone": "casual", "steps": "shown", "length": "detailed",
                  "closing": "encouragement"}
    assert score(reply, everything) == 0.5
    assert score(reply, {**everything, "length": "brief"}) == 0.75
    with pytest.raises(ValueError):
        score(reply, {})


def test_make_reply_rejects_unknown_values() -> None:
    rng = random.Random(0)
    with pytest.raises(ValueError):
        make_reply(make_problem(rng), {"tone": "grumpy"}, rng)


def test_steps_walk_through_the_arithmetic() -> None:
    rng = random.Random(3)
    for _ in range(50):
        problem = make_problem(rng)
        reply = make_reply(problem, {"steps": "shown"}, rng)
        step_lines = [line for line in reply.splitlines() if line.startswith("Step ")]
        assert len(step_lines) == len(problem.ops) + 1
        assert str(problem.answer) in step_lines[-1]


def test_problems_vary_and_their_answers_are_right() -> None:
    rng = random.Random(0)
    problems = [make_problem(rng) for _ in range(300)]
    assert len({p.question for p in problems}) > 250
    assert len({p.who for p in problems}) >= 15 and len({p.item for p in problems}) >= 12
    assert {p.ops for p in problems} >= {("+",), ("-",), ("x",), ("+", "-"), ("x", "+")}
    for p in problems:
        value = p.numbers[0]
        for op, number in zip(p.ops, p.numbers[1:], strict=True):
            value = {"+": value + number, "-": value - number, "x": value * number}[op]
            assert value > 0
        assert value == p.answer
        assert all(str(n) in p.question for n in p.numbers)


def test_generators_are_deterministic_for_a_seed() -> None:
    def draw(seed: int) -> list[str]:
        rng = random.Random(seed)
        out = []
        for _ in range(20):
            problem = make_problem(rng)
            prefs = random_prefs(rng, rng.randint(1, 4))
            out += [problem.question, make_reply(problem, sample_attrs(rng, prefs), rng),
                    instruction(prefs, rng), instruction(prefs, rng, style="hint")]
        return out

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_phrases_cover_every_value_and_never_contain_the_opposite() -> None:
    assert set(PHRASES) == {(name, value) for name, values in ATTRIBUTES.items()
                            for value in values}
    everything = [p for phrases in PHRASES.values() for p in phrases]
    assert len(everything) == len(set(everything))
    for name, (first, second) in ATTRIBUTES.items():
        assert len(PHRASES[(name, first)]) >= 3 and len(PHRASES[(name, second)]) >= 3
        for mine, theirs in [(first, second), (second, first)]:
            for phrase in PHRASES[(name, mine)]:
                for other in PHRASES[(name, theirs)]:
                    assert other.lower() not in phrase.lower(), (phrase, other)


@pytest.mark.parametrize("style", ["natural", "hint"])
def test_instruction_names_each_preference_with_a_phrase(style: str) -> None:
    rng = random.Random(style)
    for _ in range(200):
        prefs = random_prefs(rng, rng.randint(1, 4))
        text = instruction(prefs, rng, style=style).lower()
        for (name, value), phrases in PHRASES.items():
            named = any(p.lower() in text for p in phrases)
            assert named == (prefs.get(name) == value), (prefs, text)


def test_hint_style_is_one_capitalised_sentence_per_phrase() -> None:
    rng = random.Random(1)
    prefs = {"tone": "casual", "closing": "encouragement"}
    text = instruction(prefs, rng, style="hint")
    sentences = re.findall(r"[^.]+\.", text)
    assert len(sentences) == 2 and all(s.strip()[0].isupper() for s in sentences)
    with pytest.raises(ValueError):
        instruction(prefs, rng, style="shouting")
    with pytest.raises(ValueError):
        instruction({}, rng)


def test_sample_attrs_takes_defaults_at_the_default_rate() -> None:
    rng = random.Random(0)
    draws = [sample_attrs(rng) for _ in range(4000)]
    for name, default in DEFAULTS.items():
        rate = sum(d[name] == default for d in draws) / len(draws)
        assert abs(rate - DEFAULT_RATE) < 0.03, (name, rate)
    fixed = sample_attrs(rng, {"tone": "casual", "length": "detailed"})
    assert fixed["tone"] == "casual" and fixed["length"] == "detailed"


def test_random_prefs_names_that_many_attributes() -> None:
    rng = random.Random(0)
    for count in range(1, 5):
        prefs = random_prefs(rng, count)
        assert len(prefs) == count
        assert all(value in ATTRIBUTES[name] for name, value in prefs.items())
