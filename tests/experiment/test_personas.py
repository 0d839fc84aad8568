"""Simulated users: the persona schema, ratings and corrections (persona -> next state)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from nextstate.experiment import wording
from nextstate.experiment.personas import (
    Persona,
    PersonaError,
    SimulatedUser,
    load_personas,
)
from nextstate.experiment.styles import (
    ATTRIBUTES,
    DEFAULTS,
    PHRASES,
    make_problem,
    make_reply,
)

STUDENT = {"tone": "casual", "steps": "shown", "length": "detailed", "closing": "encouragement"}


def reply_with(attrs: dict[str, str], seed: int = 0) -> str:
    rng = random.Random(seed)
    return make_reply(make_problem(rng), attrs, rng)


def test_the_shipped_personas_are_the_papers_two_and_three_in_their_own_words() -> None:
    personas = load_personas()
    assert set(personas) == {"student", "teacher", "student-own-words", "teaching-assistant",
                             "defaults"}
    assert personas["student"].prefers == STUDENT
    assert personas["student-own-words"].prefers == STUDENT
    assert personas["teaching-assistant"].prefers == {
        "tone": "formal", "steps": "shown", "length": "detailed", "closing": "encouragement"}
    assert personas["defaults"].prefers == DEFAULTS
    assert {n for n, p in personas.items() if p.wording == "held-out"} == {
        "student-own-words", "teaching-assistant", "defaults"}
    assert personas["student"].wording is None and personas["teacher"].wording is None
    assert personas["teacher"].prefers["tone"] == "formal"
    assert personas["teacher"].prefers["closing"] == "none"


@pytest.mark.parametrize("matching", range(5))
def test_the_score_is_the_share_of_preferences_met(matching: int) -> None:
    persona = Persona("student", STUDENT)
    attrs = {a: (v if i < matching else next(x for x in ATTRIBUTES[a] if x != v))
             for i, (a, v) in enumerate(STUDENT.items())}
    assert persona.score(reply_with(attrs)) == matching / 4


def test_a_pleased_user_thanks_and_moves_on() -> None:
    persona = load_personas()["student"]
    satisfied, said = SimulatedUser(persona, random.Random(0)).react(reply_with(STUDENT))
    assert satisfied
    assert said in persona.thanks


def test_a_correction_names_every_unmet_preference_and_restates_the_met_ones() -> None:
    persona = load_personas()["student"]
    reply = reply_with({**STUDENT, "tone": "formal", "closing": "none"})
    for seed in range(20):
        satisfied, said = SimulatedUser(persona, random.Random(seed)).react(reply)
        assert not satisfied
        ask, _, keep = said.partition(" And still ")
        assert any(p.lower() in ask.lower() for p in persona.phrases("tone"))
        assert any(p.lower() in ask.lower() for p in persona.phrases("closing"))
        assert any(p in keep for p in persona.phrases("steps"))
        assert any(p in keep for p in persona.phrases("length"))
        assert ask.split(".")[0] + "." in persona.openers


def test_without_restate_a_correction_names_only_what_is_missing() -> None:
    persona = Persona("terse", STUDENT, restate=False)
    _, said = SimulatedUser(persona, random.Random(1)).react(
        reply_with({**STUDENT, "tone": "formal"}))
    assert "And still" not in said


def test_default_phrases_are_the_models_own_instruction_vocabulary() -> None:
    plain = Persona("plain", {"steps": "shown"})
    assert plain.phrases("steps") == PHRASES[("steps", "shown")]
    custom = load_personas()["student"]
    assert custom.phrases("tone") == ("too stiff, talk to me like a friend",
                                      "this sounds like a robot, be more casual")


def test_any_persona_file_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("personas:\n  terse:\n    prefers: {length: brief, closing: none}\n"
                    "    max_turns: 2\n    restate: false\n")
    terse = load_personas(path)["terse"]
    assert terse.prefers == {"length": "brief", "closing": "none"}
    assert (terse.max_turns, terse.restate) == (2, False)
    assert terse.score(reply_with({"length": "brief", "closing": "encouragement"})) == 0.5


@pytest.mark.parametrize(("text", "message"), [
    ("[]", "top-level `personas:`"),
    ("personas: {}", "top-level `personas:`"),
    ("personas:\n  x: {description: hi}", "needs a `prefers:`"),
    ("personas:\n  x: {prefers: {humour: dry}}", "unknown attribute 'humour'"),
    ("personas:\n  x: {prefers: {tone: sarcastic}}", "tone is one of formal | casual"),
    ("personas:\n  x: {prefers: {}}", "prefers nothing"),
    ("personas:\n  x: {prefers: {tone: casual}, corrections: {steps: [go]}}",
     "corrections for attributes it does not prefer"),
    ("personas:\n  x: {prefers: {tone: casual}, wording: test}",
     "wording is one of train | held-out"),
])
def test_a_file_off_the_schema_says_what_is_wrong(tmp_path: Path, text: str,
                                                  message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PersonaError, match=message.replace("|", r"\|").replace("(", r"\(")):
        load_personas(path)


@pytest.mark.parametrize("name", ["student-own-words", "teaching-assistant", "defaults"])
def test_a_held_out_persona_speaks_only_in_held_out_words(name: str) -> None:
    persona = load_personas()[name]
    train = wording.vocabulary("train")
    rng = random.Random(name)
    said_thanks = corrected = 0
    for seed in range(300):
        reply = make_reply(make_problem(rng), {a: rng.choice(v) for a, v in ATTRIBUTES.items()},
                           rng)
        satisfied, said = SimulatedUser(persona, random.Random(seed)).react(reply)
        assert not wording.content_words(said) & train, said
        said_thanks += satisfied
        corrected += not satisfied
        if satisfied:
            assert said in wording.THANKS["held-out"]
    assert said_thanks and corrected


def test_a_held_out_correction_restates_the_met_preferences_in_its_own_words() -> None:
    persona = load_personas()["student-own-words"]
    reply = reply_with({**STUDENT, "tone": "formal"})
    for seed in range(20):
        _, said = SimulatedUser(persona, random.Random(seed)).react(reply)
        assert any(r.strip(" .,:") in said for r in wording.RESTATES["held-out"]), said
    terse = Persona("terse", STUDENT, restate=False, wording="held-out")
    for seed in range(20):
        _, said = SimulatedUser(terse, random.Random(seed)).react(reply)
        assert not any(r.strip(" .,:") in said for r in wording.RESTATES["held-out"]), said
