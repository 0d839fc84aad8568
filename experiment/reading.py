"""Plain reading for the toy model: the words of both wording splits outside any
instruction (experiment -> ``pretrain``'s "reading" rows).

A real model has read its words in ordinary text long before anyone asks it for a style;
the toy reads them here. Every lexeme of a meaning fills the same frames, so a held-out
word is read in the very contexts of its train synonyms, and now and then two words are
named as near synonyms. Held-out words appear only here, never in an instruction the toy
is trained to follow (tested in tests/experiment/test_wording.py).
"""

from __future__ import annotations

import random

from nextstate.experiment.wording import LEXEMES, capitalise

# Sentences outside any instruction, each with one slot; every lexeme of a class fills the
# same frames, so a held-out word is read in the very contexts of its train synonyms.
READING_FRAMES: dict[str, tuple[str, ...]] = {
    "casual": ("{who} has a {x} way of talking.", "The party was {x} and nobody wore a tie.",
               "Her letters to old friends are {x} and warm.",
               "We had a {x} chat over coffee.", "The cafe has a {x} feel on Sundays."),
    "casual-bad": ("His speech at the funeral was far too {x}.",
                   "The new clerk was {x} with the customers.",
                   "A {x} remark in a contract looks bad."),
    "formal": ("The judge sent a {x} letter to the court.",
               "Everyone at the ceremony was {x}.",
               "{who} gave a {x} speech at the bank.",
               "The invitation was printed in a {x} style."),
    "formal-bad": ("The actor read his lines in a {x} way and the crowd was bored.",
                   "The manual felt {x} and nobody enjoyed it.",
                   "Her first interview answers were {x}."),
    "casual-who": ("{who} talks to the new pupil like {x}.",
                   "At the market he chatted like {x}."),
    "formal-who": ("The letter was worded like {x}.",
                   "She explained the rules like {x}."),
    "working": ("The teacher wrote the whole {x} on the board.",
                "A proper proof shows the {x} clearly.",
                "{who} checked the {x} twice before the exam."),
    "explain": ("The guide will {x} the route before the hike.",
                "Ask the coach to {x} the plan for the game."),
    "detail": ("The museum guide added a lot of {x} about the paintings.",
               "The news story gave plenty of {x} about the storm."),
    "long": ("The article was {x} and covered everything.",
             "{who} wrote a {x} review of the film."),
    "short": ("{who} left a {x} message on the fridge.",
              "The captain gave a {x} order."),
    "long-bad": ("The lecture was {x} and half the room fell asleep.",
                 "Nobody finished the {x} email from the office."),
    "short-bad": ("The menu was {x}, with only two dishes.",
                  "The weather forecast was {x} and told us little."),
    "cheer": ("The coach gave the team some {x} before the game.",
              "After the race, {who} got plenty of {x} from the crowd.",
              "A little {x} helps a nervous student."),
    "cheer-verb": ("My grandmother always wants to {x} before a test.",
                   "I asked my brother to {x} at the race."),
    "unwind": ("After work {who} likes to {x} by the sea.",
               "On holiday it is easy to {x} and forget the office."),
    "result": ("The {x} of the vote was read out at noon.",
               "{who} wrote the {x} at the bottom of the page."),
    "expand": ("The author promised to {x} in the second chapter.",
               "At the meeting {who} was asked to {x} on the plan."),
    "shorten": ("The editor told {who} to {x} before printing.",
                "The speech ran long, so we had to {x}."),
    "remove": ("{who} decided to {x} dessert tonight.",
               "The editor asked us to {x} the final paragraph."),
    "add": ("The chef likes to {x} a pinch of salt.",
            "Never forget to {x} your name on the form."),
    "needed": ("A coat is {x} in the winter.", "A ticket is {x} for the museum."),
    "finish": ("The band will {x} with a slow song.", "{who} likes to {x} the day with tea."),
}
NAMES = ("Ava", "Ben", "Chloe", "Dev", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack")


# Sentences naming two words of the same meaning, as a thesaurus or a teacher would; this
# share of reading sentences.
PAIRS = 0.4
PAIR_FRAMES = ("People use \"{x}\" and \"{y}\" for much the same thing.",
               "\"{x}\" is close in meaning to \"{y}\".",
               "{who} said \"{x}\", which here means \"{y}\".")


def reading(rng: random.Random, sentences: int = 4) -> str:
    """A short plain document: sentences that use lexemes of both splits outside any
    instruction, several of the same meaning side by side, now and then two of them
    named as near synonyms."""
    out = []
    for _ in range(sentences):
        slot = rng.choice(sorted(READING_FRAMES))
        words = LEXEMES[slot]["train"] + LEXEMES[slot]["held-out"]
        if rng.random() < PAIRS:
            # Most pairs name a word next to one of its train synonyms.
            x = rng.choice(words)
            y = rng.choice([w for w in (LEXEMES[slot]["train"] if rng.random() < 0.7
                                        else words) if w != x])
            out.append(rng.choice(PAIR_FRAMES).format(x=x, y=y, who=rng.choice(NAMES)))
            continue
        frame = rng.choice(READING_FRAMES[slot])
        out.append(frame.format(x=rng.choice(words), who=rng.choice(NAMES)))
        # The same frame again with another word of the same meaning, now and then.
        if rng.random() < 0.5:
            out.append(frame.format(x=rng.choice(words), who=rng.choice(NAMES)))
    return " ".join(capitalise(s) for s in out)
