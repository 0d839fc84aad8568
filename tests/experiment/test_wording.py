"""The instruction grammar and its split (learner.experiment.wording): the held-out part
shares no template and no content word with the train part, and pretraining never shows
a held-out word in an instruction."""

from __future__ import annotations

import random

import pytest

from nextstate.experiment import pretrain as P
from nextstate.experiment import reading as R
from nextstate.experiment import wording as W
from nextstate.experiment.styles import ATTRIBUTES, PHRASES, random_prefs

HELD = W.vocabulary("held-out")
TRAIN = W.vocabulary("train")


def sentences(split: str, count: int, seed: int = 0, typos: float = 0.0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        prefs = W.sample_prefs(rng)
        out.append(W.instruction(prefs, rng, split, typos=typos))
        out.append(W.instruction(prefs, rng, split, style="hint", typos=typos))
        everything = random_prefs(rng, 4)
        unmet = dict(list(everything.items())[:rng.randint(1, 4)])
        met = {a: v for a, v in everything.items() if a not in unmet}
        out.append(W.correction(unmet, met, rng, split, typos=typos))
        out.append(W.thanks(rng, split))
    return out


def test_the_splits_share_no_template() -> None:
    for table in (W.ASKS, W.LEXEMES):
        for key, split in table.items():
            assert split["train"] and split["held-out"], key
            assert not set(split["train"]) & set(split["held-out"]), key
    # (Both may leave an imperative bare: "{vp}" is no wrapper.)
    assert not set(W.parts("train")) & set(W.parts("held-out")) - {"{vp}"}
    # A template with its slot words swapped is still the same template.
    shapes = {split: {t.split(":", 1)[1] for table in W.ASKS.values() for t in table[split]}
              for split in W.SPLITS}
    assert not shapes["train"] & shapes["held-out"]


def test_the_splits_share_no_content_word() -> None:
    assert HELD and TRAIN
    assert not TRAIN & HELD, sorted(TRAIN & HELD)


@pytest.mark.parametrize("split", W.SPLITS)
def test_a_sentence_uses_only_the_words_of_its_split(split: str) -> None:
    other = TRAIN if split == "held-out" else HELD
    for sentence in sentences(split, 500, seed=len(split)):
        assert not W.content_words(sentence) & other, sentence
    assert any(W.content_words(s) & HELD for s in sentences("held-out", 50))


def test_every_fixed_phrase_of_the_shipped_personas_is_a_train_ask() -> None:
    for key, phrases in PHRASES.items():
        for phrase in phrases:
            assert f"free:{phrase}" in W.ASKS[key]["train"]
    assert set(W.ASKS) == {(a, v) for a, values in ATTRIBUTES.items() for v in values}


def test_pretraining_never_shows_a_held_out_word_in_an_instruction() -> None:
    # Reading documents carry the held-out synonyms (as any text a model reads would);
    # user messages and hints never do, nor anything but a lexeme of the held-out part.
    frames = HELD - set().union(*(W.content_words(x) for t in W.LEXEMES.values()
                                  for x in t["held-out"]))
    seen_in_reading: set[str] = set()
    for conversation in P.conversations(0, 3000):
        for message in conversation:
            words = W.content_words(message["content"])
            if message["role"] == "user":
                assert not words & HELD, message["content"]
            elif message["role"] == P.DOCUMENT:
                assert not words & frames, message["content"]
                seen_in_reading |= words & HELD
    lexemes = set().union(*(W.content_words(x) for t in W.LEXEMES.values()
                            for x in t["held-out"]))
    assert seen_in_reading == lexemes  # every held-out synonym is read somewhere


def test_an_instruction_asks_for_every_preference_and_is_reproducible() -> None:
    prefs = {"tone": "casual", "steps": "shown", "length": "brief", "closing": "none"}
    one = W.instruction(prefs, random.Random(3), "held-out")
    assert one == W.instruction(prefs, random.Random(3), "held-out")
    # Four asks, joined: as many pieces as preferences once the joins are cut.
    with pytest.raises(ValueError, match="at least one"):
        W.instruction({}, random.Random(0))
    with pytest.raises(ValueError, match="unknown split"):
        W.instruction(prefs, random.Random(0), "test")
    with pytest.raises(ValueError, match="something unmet"):
        W.correction({}, prefs, random.Random(0))


def test_a_correction_restates_what_was_met_after_what_was_missing() -> None:
    rng = random.Random(0)
    for _ in range(50):
        said = W.correction({"tone": "casual"}, {"steps": "shown"}, rng, "train", typos=0)
        assert any(r.strip(" .,") in said for r in W.RESTATES["train"]), said


def test_typos_change_one_word_at_the_given_rate() -> None:
    rng = random.Random(0)
    text = "please explain the working and keep the tone relaxed"
    changed = [W._typos(text, rng, 0.5) for _ in range(400)]
    assert 0.4 < sum(c != text for c in changed) / 400 < 0.6
    for c in changed:
        diff = [a for a, b in zip(c.split(), text.split(), strict=True) if a != b]
        assert len(diff) <= 1 and len(c.split()) == len(text.split())
    assert W._typos(text, rng, 0.0) == text


def test_reading_documents_put_synonyms_in_the_same_frames() -> None:
    assert set(R.READING_FRAMES) == set(W.LEXEMES)
    rng = random.Random(0)
    text = " ".join(R.reading(rng) for _ in range(300))
    for slot in ("casual", "working", "cheer"):
        for word in W.LEXEMES[slot]["train"] + W.LEXEMES[slot]["held-out"]:
            assert word in text, word
