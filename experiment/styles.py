"""The experiment's shared vocabulary: word problems, styled replies, detectors, wordings.

Data flow: ``make_problem`` -> user message; ``make_reply`` -> assistant reply for
``pretrain``'s synthetic conversations; ``PHRASES`` / ``instruction`` -> what a (simulated)
user writes to ask for a style, and what the learner's hint carries; ``detect`` / ``score``
-> the benchmark's reading of any reply, whoever wrote it. Pure Python, no torch.

A reply has four independent style attributes, each with two values; the first value of
each pair is the default a model shows without an instruction (``DEFAULT_RATE`` of the time):

    tone     formal | casual          opener and answer sentence
    steps    answer-only | shown      "Step N:" lines before the answer
    length   brief | detailed         two extra explanatory sentences after the answer
    closing  none | encouragement     a last sentence cheering the user on

Each attribute is written and detected through its own marker phrases, and no marker of
one attribute occurs in the text another attribute contributes (the tests check this on
every combination), so the four detectors cannot disturb each other. A reply without any
marker (garbage, an empty string) reads as all defaults.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass

ATTRIBUTES: dict[str, tuple[str, str]] = {
    "tone": ("formal", "casual"),
    "steps": ("answer-only", "shown"),
    "length": ("brief", "detailed"),
    "closing": ("none", "encouragement"),
}
DEFAULTS: dict[str, str] = {name: values[0] for name, values in ATTRIBUTES.items()}
# Without an instruction each attribute takes its default this often, independently.
DEFAULT_RATE = 0.75

# --- problems ------------------------------------------------------------------------------

NAMES = ("Ava", "Ben", "Chloe", "Dev", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack",
         "Kai", "Lena", "Maya", "Noah", "Omar", "Priya", "Sam", "Tara", "Yuki", "Zoe")
ITEMS = ("apple", "book", "pencil", "cookie", "marble", "ticket", "sticker", "coin",
         "flower", "shell", "card", "egg", "orange", "cup", "stone", "balloon")
# Each template: (ops applied left to right, question with {who} {item} {a} {b} {c}).
_PROBLEMS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("+",), "{who} has {a} {item}s and buys {b} more. How many {item}s does {who} have now?"),
    (("+",), "{who} picked {a} {item}s in the morning and {b} in the afternoon. How many "
             "{item}s is that?"),
    (("-",), "{who} had {a} {item}s and gave {b} away. How many {item}s are left?"),
    (("-",), "There are {a} {item}s in a box. {who} takes {b}. How many {item}s stay in the "
             "box?"),
    (("x",), "{who} has {a} bags with {b} {item}s in each. How many {item}s is that in "
             "total?"),
    (("+", "-"), "{who} has {a} {item}s, finds {b} more and then loses {c}. How many {item}s "
                 "does {who} have?"),
    (("-", "+"), "{who} had {a} {item}s, sold {b} and then bought {c}. How many {item}s does "
                 "{who} have now?"),
    (("x", "+"), "{who} buys {a} packs of {b} {item}s and already had {c}. How many {item}s "
                 "does {who} have?"),
)


@dataclass(frozen=True)
class Problem:
    """A word problem: ``numbers[0] ops[0] numbers[1] ops[1] ...`` evaluated left to right."""

    question: str
    numbers: tuple[int, ...]
    ops: tuple[str, ...]
    answer: int
    who: str
    item: str


def _apply(value: int, op: str, number: int) -> int:
    return value + number if op == "+" else value - number if op == "-" else value * number


def make_problem(rng: random.Random) -> Problem:
    """A random problem with small numbers (every intermediate result stays positive)."""
    ops, template = rng.choice(_PROBLEMS)
    who, item = rng.choice(NAMES), rng.choice(ITEMS)
    if ops[0] == "x":
        numbers = [rng.randint(2, 9), rng.randint(2, 9)]
    elif ops[0] == "-":
        b = rng.randint(1, 20)
        numbers = [b + rng.randint(1, 20), b]
    else:
        numbers = [rng.randint(2, 30), rng.randint(2, 30)]
    value = _apply(numbers[0], ops[0], numbers[1])
    if len(ops) == 2:
        numbers.append(rng.randint(1, value - 1) if ops[1] == "-" else rng.randint(2, 20))
        value = _apply(value, ops[1], numbers[2])
    question = template.format(who=who, item=item, **dict(zip("abc", numbers, strict=False)))
    return Problem(question, tuple(numbers), ops, value, who, item)


# --- replies -------------------------------------------------------------------------------

# A reply's first sentence. No opener starts with the word another tone's opener starts
# with, so a reply's first token decides its tone (``following.tone_readings`` rests on it).
OPENERS = {
    "formal": ("Certainly.", "Here is the solution.", "Let us solve this.",
               "I will compute this carefully."),
    "casual": ("Hey!", "Ooh, fun one!", "Sure thing!", "Alright, let's see."),
}
_ANSWERS = {
    "formal": ("The answer is {n}.", "Therefore, the result is {n}.",
               "The final answer is {n}."),
    "casual": ("So it's {n}, easy!", "Boom, {n}!", "That makes {n}, yay!"),
}
# Replies repeat numbers but never names or objects: the pretrained toy model copies
# numbers from the question reliably and names poorly (it wrote "Chloe starts with 5
# marbles" for Iris's books), and only the style is scored.
_FIRST_STEP = ("Step 1: start with {a}.", "Step 1: begin with {a}.")
_STEP = ("Step {i}: {v} {op} {n} = {r}.", "Step {i}: {v} {op} {n} gives {r}.")
_DETAILS = (
    "In other words, the count comes to {n}.",
    "To double-check, go through the numbers {numbers} once more in order.",
    "Put another way, the total ends up at {n}.",
    "This works because each change is applied in the order of the story.",
)
_ENCOURAGEMENTS = ("Keep up the great work!", "You're doing great, keep practicing!",
                   "Nice work sticking with these problems!", "You've got this!")


def make_reply(problem: Problem, attrs: Mapping[str, str], rng: random.Random) -> str:
    """The reply to ``problem`` with exactly the given attribute values (missing ones take
    the default); templates are drawn from ``rng`` so the wording varies."""
    values = {**DEFAULTS, **attrs}
    for name, value in values.items():
        if value not in ATTRIBUTES[name]:
            raise ValueError(f"unknown value {value!r} for {name!r}")
    lines = [rng.choice(OPENERS[values["tone"]])]
    if values["steps"] == "shown":
        lines.extend(_steps(problem, rng))
    sentences = [rng.choice(_ANSWERS[values["tone"]]).format(n=problem.answer)]
    if values["length"] == "detailed":
        numbers = ", ".join(str(n) for n in problem.numbers)
        for detail in rng.sample(_DETAILS, 2):
            sentences.append(detail.format(n=problem.answer, numbers=numbers))
    if values["closing"] == "encouragement":
        sentences.append(rng.choice(_ENCOURAGEMENTS))
    # Step lines each get their own line; the answer and what follows form one paragraph.
    return "\n".join([*lines, " ".join(sentences)]) if len(lines) > 1 else \
        " ".join([*lines, *sentences])


def _steps(problem: Problem, rng: random.Random) -> list[str]:
    lines = [rng.choice(_FIRST_STEP).format(a=problem.numbers[0])]
    value = problem.numbers[0]
    for i, (op, number) in enumerate(zip(problem.ops, problem.numbers[1:], strict=True)):
        result = _apply(value, op, number)
        lines.append(rng.choice(_STEP).format(i=i + 2, v=value, op=op, n=number, r=result))
        value = result
    return lines


# --- detectors -----------------------------------------------------------------------------

# Marker phrases per attribute value, matched case-insensitively on word boundaries.
_CASUAL = ("hey", "ooh", "sure thing", "alright", "let's see", "it's", "easy", "boom", "yay")
_FORMAL = ("certainly", "here is the solution", "let us", "i will compute", "the answer is",
           "therefore", "the result is", "the final answer")
_STEP_LINE = re.compile(r"(?im)^\s*step\s+\d+\s*:")
_DETAILED = ("in other words", "to double-check", "put another way", "this works because")
_ENCOURAGING = ("keep up the great work", "you're doing great", "keep practicing",
                "nice work", "you've got this")


def _count(text: str, phrases: tuple[str, ...]) -> int:
    return sum(len(re.findall(rf"(?<!\w){re.escape(p)}(?!\w)", text)) for p in phrases)


def detect(reply: str) -> dict[str, str]:
    """Read the four attribute values off any reply.

    tone: casual when casual markers outnumber formal ones (ties, none: formal);
    steps: shown when a line starts with "Step N:"; length: detailed when any detail
    marker occurs; closing: encouragement when any encouragement marker occurs.
    """
    text = reply.lower().replace("\u2019", "'")
    return {
        "tone": "casual" if _count(text, _CASUAL) > _count(text, _FORMAL) else "formal",
        "steps": "shown" if _STEP_LINE.search(text) else "answer-only",
        "length": "detailed" if _count(text, _DETAILED) else "brief",
        "closing": "encouragement" if _count(text, _ENCOURAGING) else "none",
    }


def score(reply: str, preferences: Mapping[str, str]) -> float:
    """The fraction of ``preferences`` (attribute -> wanted value) the reply matches."""
    if not preferences:
        raise ValueError("no preferences to score against")
    found = detect(reply)
    return sum(found[name] == value for name, value in preferences.items()) / len(preferences)


# --- instructions --------------------------------------------------------------------------

# What a user writes to ask for each value. No phrase contains a phrase of the other value
# of its attribute (tested), so "don't ..." wordings cannot be read as their opposite.
PHRASES: dict[tuple[str, str], tuple[str, ...]] = {
    ("tone", "formal"): ("please be formal", "keep it professional", "use a formal tone",
                         "too chatty, be more formal", "write like a textbook",
                         "sound more professional"),
    ("tone", "casual"): ("talk to me like a friend", "be more casual", "too stiff, loosen up",
                         "keep the tone relaxed", "no need to sound so serious",
                         "you sound like a robot, be friendlier"),
    ("steps", "shown"): ("show me the steps", "walk me through it", "show your work",
                         "explain step by step", "I want to see how you got there",
                         "show how you got it"),
    ("steps", "answer-only"): ("just the answer", "skip the steps", "only the final number",
                               "no working needed", "leave out the steps",
                               "don't show the working"),
    ("length", "brief"): ("keep it short", "be brief", "fewer words please",
                          "too long, shorten it", "keep it concise", "no extra explanation"),
    ("length", "detailed"): ("give me more detail", "explain a bit more", "be thorough",
                             "too short, say more", "elaborate a little",
                             "explain it in more detail"),
    ("closing", "encouragement"): ("end with some encouragement", "cheer me on at the end",
                                   "add a word of encouragement", "motivate me a little",
                                   "a little pep talk at the end would be nice",
                                   "encourage me a bit"),
    ("closing", "none"): ("no pep talk", "skip the encouragement", "no cheering needed",
                          "no closing remarks", "end right after the answer",
                          "no motivational lines"),
}
# Openings a natural-worded instruction may start with (a correction often starts so).
_LEADS = ("", "", "", "Please: ", "Hmm, ", "Next time, ", "Thanks, but ", "No, ", "Also, ",
          "One thing: ", "Not quite. ", "Hmm, no. ", "That's not what I wanted. ",
          "That is not what I asked for. ", "No, please revise. ", "Close, but ")
# Joins between phrases; the later ones restate preferences that were already met.
_JOINS = (", ", " and ", ". ", "; ", ", ", " and ", ". And still ", ". And keep ", ", but ")


def instruction(prefs: Mapping[str, str], rng: random.Random, *,
                style: str = "natural") -> str:
    """Words asking for ``prefs`` (attribute -> value), one phrase of PHRASES each, in a
    random order.

    ``natural``: a sentence or a few as a user would type them, sometimes with an opening
    ("No, ", "Thanks, but "); ``hint``: the terse text the learner appends after its hint
    marker, one capitalised sentence per phrase.
    """
    if style not in ("natural", "hint"):
        raise ValueError(f"unknown style {style!r}")
    if not prefs:
        raise ValueError("an instruction needs at least one preference")
    names = list(prefs)
    rng.shuffle(names)
    phrases = [rng.choice(PHRASES[(name, prefs[name])]) for name in names]
    if style == "hint":
        return " ".join(_capitalise(p) + "." for p in phrases)
    text = phrases[0]
    for phrase in phrases[1:]:
        join = rng.choice(_JOINS)
        text += join + (_capitalise(phrase) if join == ". " else phrase)
    lead = rng.choice(_LEADS)
    text = _capitalise(text) if not lead or lead.endswith(". ") else text
    return lead + text + rng.choice((".", "!", ".", ""))


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def sample_attrs(rng: random.Random, fixed: Mapping[str, str] | None = None) -> dict[str, str]:
    """Attribute values as a model without (or beyond) an instruction would pick them: each
    attribute not in ``fixed`` takes its default with probability DEFAULT_RATE."""
    fixed = fixed or {}
    return {name: fixed.get(name) or (values[0] if rng.random() < DEFAULT_RATE else values[1])
            for name, values in ATTRIBUTES.items()}


def random_prefs(rng: random.Random, count: int) -> dict[str, str]:
    """``count`` attributes picked at random, each with a value picked 50/50."""
    names = rng.sample(sorted(ATTRIBUTES), count)
    return {name: rng.choice(ATTRIBUTES[name]) for name in sorted(names)}
