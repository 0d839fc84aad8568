"""How people ask for a style: a compositional grammar of instructions, split in two.

Data flow: ``instruction`` / ``correction`` / ``thanks`` -> what ``pretrain`` teaches the
toy model to follow (the ``train`` part only) and what a simulated user says
(``personas``: the ``held-out`` part for the personas that test generalisation);
``reading.py`` writes plain documents in which every word of both parts appears outside
any instruction, the toy's stand-in for the general text a real model has read. Pure
Python.

An instruction is built from parts, each part belonging to one split:

    asks       a template per preference, in a few shapes: "be more {casual}", "use a
               {casual} tone", negations of the other value ("don't be so {formal}",
               "no need to show the {working}"), complaints ("way too {stiff}")
    lexemes    the words filling a template's slots: synonyms per meaning
    wrappers   indirect requests around an imperative ask ("could you ...", "I'd
               appreciate it if you'd ...")
    joins      several preferences in one sentence ("..., and ...", "... plus ...")
    leads      how a correction opens ("Not quite.", "Ugh.")
    reasons    context ("it's for my homework", "this is for a handout", "my kid is 8")
    fillers    politeness and filler ("please", "honestly")
    restates   how a correction repeats what was already right ("And still ...")
    hints      the terse forms a judge writes a hint in ("The reply should ...")
    thanks     what a pleased user says

The two splits share no template and no content word: every word of a held-out part that
is not a function word (``FUNCTION_WORDS``) is absent from every train part (tested), so a
held-out sentence is new in its templates and its vocabulary, not only in its word order.
The train part contains every phrase of ``styles.PHRASES`` (the wordings the shipped
student and teacher personas use). Typos are a process, not vocabulary: both splits get
them at the same rate.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Mapping, Sequence

from nextstate.experiment.styles import ATTRIBUTES, PHRASES, random_prefs

SPLITS = ("train", "held-out")
Split = str
Pair = tuple[str, str]  # (train, held-out) is how every table below is written

# --- lexemes: the words filling the slots of asks ------------------------------------------

LEXEMES: dict[str, dict[Split, tuple[str, ...]]] = {
    # tone
    "casual": {"train": ("casual", "relaxed", "friendly", "chill", "warm", "easy", "fun"),
               "held-out": ("informal", "easygoing", "mellow", "breezy")},
    "casual-bad": {"train": ("chatty", "cheeky", "silly", "jokey", "loose"),
                   "held-out": ("sloppy", "flippant", "goofy", "slangy")},
    "formal": {"train": ("formal", "professional", "serious", "proper", "official", "precise",
                         "respectful"),
               "held-out": ("polished", "businesslike", "academic", "dignified")},
    "formal-bad": {"train": ("stiff", "robotic", "dry", "rigid", "boring"),
                   "held-out": ("stuffy", "uptight", "wooden", "cold")},
    "casual-who": {"train": ("a friend", "a pal", "a classmate", "a brother"),
                   "held-out": ("a buddy", "my mate", "a neighbour")},
    "formal-who": {"train": ("a textbook", "a teacher", "a professor", "a judge"),
                   "held-out": ("a lawyer", "a banker", "a diplomat")},
    "unwind": {"train": ("loosen up", "relax", "settle"),
               "held-out": ("lighten up", "unwind")},
    # steps
    "working": {"train": ("steps", "working", "work", "process", "workings", "sums"),
                "held-out": ("reasoning", "calculation", "breakdown", "method")},
    "explain": {"train": ("explain", "show", "walk me through", "go through", "write out",
                          "describe"),
                "held-out": ("outline", "demonstrate", "clarify", "illustrate")},
    "result": {"train": ("answer", "final number", "number", "solution"),
               "held-out": ("result", "sum", "outcome")},
    # length
    "detail": {"train": ("detail", "explanation", "depth", "info", "explaining", "examples"),
               "held-out": ("background", "context", "elaboration", "commentary")},
    "long": {"train": ("longer", "thorough", "fuller", "detailed", "deeper", "complete"),
             "held-out": ("comprehensive", "richer", "wordier", "exhaustive")},
    "short": {"train": ("short", "brief", "concise", "quick", "simple", "small"),
              "held-out": ("succinct", "compact", "tight", "crisp")},
    "long-bad": {"train": ("long", "wordy", "lengthy", "drawn out"),
                 "held-out": ("rambling", "bloated", "windy", "padded")},
    "short-bad": {"train": ("short", "thin", "quick", "rushed"),
                  "held-out": ("skimpy", "bare", "sparse", "curt")},
    "expand": {"train": ("elaborate", "say more", "go deeper", "explain more"),
               "held-out": ("expand", "extend")},
    "shorten": {"train": ("shorten it", "cut it", "make it shorter"),
                "held-out": ("trim it", "condense it")},
    # closing
    "cheer": {"train": ("encouragement", "pep talk", "cheering", "motivation", "support",
                        "a boost"),
              "held-out": ("praise", "positivity", "reassurance", "kudos")},
    "cheer-verb": {"train": ("encourage me", "cheer me on", "motivate me", "support me",
                             "push me"),
                   "held-out": ("praise me", "reassure me", "applaud me", "inspire me")},
    # verbs and words any attribute's asks use
    "remove": {"train": ("skip", "leave out", "cut", "remove", "lose", "take out"),
               "held-out": ("omit", "drop", "ditch", "scrap")},
    "add": {"train": ("add", "include", "put in"),
            "held-out": ("append", "insert", "attach")},
    "needed": {"train": ("needed", "required"), "held-out": ("necessary", "essential")},
    "finish": {"train": ("end", "close", "stop", "conclude"),
               "held-out": ("finish", "wrap up")},
}

# --- asks: one template per way of asking for a value --------------------------------------
# A template is an imperative ("vp": it can take a wrapper such as "could you ...") or a
# clause ("free": negations, complaints, wishes). Slots name LEXEMES. Held-out templates
# carry their meaning in their slots: any other word in them is a frame ("vibe", "suits").


def _asks(train: Sequence[str], held: Sequence[str]) -> dict[Split, tuple[str, ...]]:
    return {"train": tuple(train), "held-out": tuple(held)}


ASKS: dict[tuple[str, str], dict[Split, tuple[str, ...]]] = {
    ("tone", "casual"): _asks(
        ["vp:be more {casual}", "vp:keep the tone {casual}", "vp:use a {casual} tone",
         "vp:sound {casual}", "vp:make it {casual}", "vp:talk to me like {casual-who}",
         "free:don't be so {formal}", "free:too {formal-bad}", "free:less {formal}",
         "free:you sound {formal-bad}, be {casual}", "vp:{unwind}", "free:too {formal}",
         "vp:{remove} the {formal} tone", "free:not so {formal-bad}"],
        ["free:could it be a tad {casual}", "vp:aim for something {casual}",
         "vp:go for a {casual} vibe", "vp:phrase it the way {casual-who} would",
         "free:it reads way too {formal-bad}", "vp:{remove} the {formal} voice",
         "free:{casual} wording suits me", "vp:{unwind} a little",
         "free:it comes across as {formal}"]),
    ("tone", "formal"): _asks(
        ["vp:be {formal}", "vp:use a {formal} tone", "vp:keep it {formal}",
         "vp:sound more {formal}", "vp:write like {formal-who}", "free:don't be so {casual}",
         "free:too {casual-bad}, be more {formal}", "free:less {casual}", "free:too {casual}",
         "vp:{remove} the {casual} tone", "free:not so {casual-bad}"],
        ["free:could it be a tad {formal}", "vp:aim for something {formal}",
         "vp:go for a {formal} register", "vp:phrase it the way {formal-who} would",
         "free:it reads way too {casual-bad}", "vp:{remove} the {casual} voice",
         "free:{formal} wording suits me", "free:it comes across as {casual}"]),
    ("steps", "shown"): _asks(
        ["vp:show me the {working}", "vp:{explain} it step by step", "vp:show your {working}",
         "vp:{explain} how you got there", "free:I want to see the {working}",
         "vp:{add} the {working}"],
        ["vp:{explain} the {working} for me", "free:the {working} matters to me",
         "vp:{add} the {working} underneath", "free:I'd like the {working} included",
         "free:a lone {result} tells me nothing"]),
    ("steps", "answer-only"): _asks(
        ["vp:{remove} the {working}", "free:no {working} {needed}",
         "free:don't show the {working}", "free:just the {result}", "free:only the {result}",
         "free:don't {explain} it step by step", "free:don't {add} the {working}"],
        ["vp:go straight to the {result}", "free:the {working} can go",
         "free:I can do without the {working}", "vp:give me the {result} alone",
         "free:the {result} alone suits me", "vp:{remove} all the {working} for me"]),
    ("length", "detailed"): _asks(
        ["vp:give me more {detail}", "vp:be {long}", "vp:{expand} a little",
         "free:too {short-bad}, say more", "free:I want more {detail}", "vp:make it {long}",
         "free:it's too {short-bad}", "vp:{add} more {detail}"],
        ["vp:go for something {long}", "vp:{expand} further",
         "free:it reads way too {short-bad}", "free:a {long} reply suits me",
         "free:I'd like additional {detail}", "vp:{add} some {detail} for me",
         "free:it comes across as {short-bad}"]),
    ("length", "brief"): _asks(
        ["vp:keep it {short}", "vp:be {short}", "free:fewer words",
         "free:too {long-bad}, {shorten}", "free:no extra {detail}",
         "free:don't add more {detail}", "vp:make it {short}", "vp:{shorten}",
         "vp:{remove} the {detail}", "free:don't {add} {detail}"],
        ["vp:go for something {short}", "vp:{shorten} a little",
         "free:it reads way too {long-bad}", "vp:{remove} all the {detail} for me",
         "free:a {short} reply suits me", "free:the {detail} can go",
         "free:it comes across as {long-bad}"]),
    ("closing", "encouragement"): _asks(
        ["vp:{finish} with some {cheer}", "vp:{cheer-verb} at the end",
         "vp:{add} a bit of {cheer}", "vp:{cheer-verb} a little",
         "free:a little {cheer} at the end would be nice", "free:I want some {cheer}"],
        ["vp:{finish} on some {cheer}", "vp:{cheer-verb} once you're done",
         "free:a last line of {cheer} suits me", "vp:{add} {cheer} afterwards",
         "free:I'd like some {cheer} underneath"]),
    ("closing", "none"): _asks(
        ["free:no {cheer}", "vp:{remove} the {cheer}", "free:no {cheer} {needed}",
         "free:no closing remarks", "vp:{finish} right after the {result}",
         "free:don't {cheer-verb}", "free:no motivational lines", "free:don't {add} {cheer}"],
        ["free:I can do without {cheer}",
         "vp:{finish} once the {result} is given", "vp:{remove} all the {cheer} for me",
         "free:the {cheer} can go"]),
}
for _key, _phrases in PHRASES.items():  # the shipped personas' wordings are train asks
    ASKS[_key]["train"] += tuple(f"free:{p}" for p in _phrases)

# --- everything around the asks -------------------------------------------------------------

WRAPPERS: dict[Split, tuple[str, ...]] = {
    "train": ("{vp}", "{vp}", "{vp}", "please {vp}", "{vp}, please", "can you {vp}",
              "could you {vp}", "try to {vp}", "I want you to {vp}"),
    "held-out": ("{vp}", "{vp}", "would you kindly {vp}", "I'd appreciate it if you'd {vp}",
                 "it would help if you'd {vp}", "do me a favour and {vp}",
                 "any chance you could {vp}", "I'd rather you {vp}"),
}
JOINS: dict[Split, tuple[str, ...]] = {
    "train": (", ", " and ", ". ", "; ", ", also ", ". Also, ", ", but "),
    "held-out": (" plus ", ", oh and ", ". Another point: ", " - and ", ". On top of that, ",
                 ", besides that "),
}
LEADS: dict[Split, tuple[str, ...]] = {
    "train": ("Not quite.", "Hmm, no.", "That's not what I wanted.", "No, please revise.",
              "That is not what I asked for.", "Close, but", "Thanks, but", "No,", "Hmm,",
              "Next time,", "One thing:"),
    "held-out": ("Ugh.", "Almost.", "Meh.", "Side note:", "Sorry to be picky, but",
                 "Okay so", "Look,", "Eh,", "Nearly there, though"),
}
REASONS: dict[Split, tuple[str, ...]] = {
    "train": ("it's for my homework", "I'm studying for a test", "my teacher checks these",
              "I'm new to this", "I'm tired today", "my class uses these"),
    "held-out": ("this is for a handout", "my kid is 8", "it goes in a report",
                 "I'm reading this on my phone", "I'm in a hurry", "my boss reads these",
                 "my daughter struggles with maths"),
}
BECAUSE: dict[Split, tuple[str, ...]] = {
    "train": (", since {r}", ", because {r}", ". {R}"),
    "held-out": (" as {r}", " - {r}", ". For context, {r}"),
}
FILLERS: dict[Split, tuple[str, ...]] = {
    "train": ("please", "thanks", "maybe", "if you can"),
    "held-out": ("honestly", "tbh", "I guess", "um", "cheers", "if that's okay"),
}
RESTATES: dict[Split, tuple[str, ...]] = {
    "train": (". And still ", ". And keep ", ", and still "),
    "held-out": (". The rest was fine, so carry on: ", ". Otherwise good, again ",
                 ". As before, "),
}
HINTS: dict[Split, tuple[str, ...]] = {  # terse judge's forms, per ask: {vp} or {free}
    "train": ("{Vp}.", "You should {vp}.", "{Free}."),
    "held-out": ("Remember to {vp}.", "Going forward, {vp}.", "Preference: {free}."),
}
THANKS: dict[Split, tuple[str, ...]] = {
    "train": ("Thanks, that's perfect!", "Great, thank you!", "Thanks, that helps a lot.",
              "Thank you, that is exactly right.", "Thanks, that works."),
    "held-out": ("Wonderful, much appreciated.", "Brilliant, just what I was after.",
                 "Lovely, appreciate it!", "Superb, that did the trick.",
                 "Spot on, cheers!", "Yes! Just like that, thank you."),
}

# Words both splits may use: they carry no preference by themselves. Any other word of a
# held-out part never occurs in a train part (tested).
_FUNCTION_TEXT = (
    "a an the and or but so if as of to in on at for with by from up it its it's i i'm i'd "
    "i'll i've me my you you're you'd your yours that's we us our is are was be been being "
    "do don't does can can't could would will that this these those what how there here "
    "not no more less too very bit little some any just only all every each one than then "
    "once also again please yes still way out off over about after before give go like much "
    "thank thanks")
FUNCTION_WORDS = frozenset(_FUNCTION_TEXT.split())

# --- building sentences ----------------------------------------------------------------------


def lexicon() -> list[str]:
    """Every lexeme of both splits, once: the tokenizer's corpus repeats it so that each
    word is a whole token, as common words are in a real model's vocabulary."""
    return sorted({w for table in LEXEMES.values() for split in SPLITS for w in table[split]})


def _check(split: Split) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (one of {', '.join(SPLITS)})")


def ask(attribute: str, value: str, rng: random.Random, split: Split = "train", *,
        wrap: bool = True) -> tuple[str, str]:
    """One way to ask for ``value`` of ``attribute``: (shape, text); shape is "vp" for an
    imperative, "free" for a clause. ``wrap``: an imperative may get an indirect-request
    wrapper ("could you ...")."""
    _check(split)
    shape, template = rng.choice(ASKS[(attribute, value)][split]).split(":", 1)
    text = fill(template, rng, split)
    if shape == "vp" and wrap:
        text = rng.choice(WRAPPERS[split]).format(vp=text)
    return shape, text


def fill(template: str, rng: random.Random, split: Split = "train") -> str:
    """A template's slots filled with words of one split: "too {casual}" -> "too chill"."""
    return re.sub(r"\{([a-z-]+)\}", lambda m: rng.choice(LEXEMES[m.group(1)][split]),
                  template)


def instruction(prefs: Mapping[str, str], rng: random.Random, split: Split = "train", *,
                style: str = "natural", typos: float = 0.15) -> str:
    """Words asking for ``prefs`` (attribute -> value), every one of them, in a random
    order, from one split only.

    ``natural``: one or a few sentences as a user types them, with now and then a reason,
    filler, a typo; ``hint``: the terse text a judge writes after its hint marker.
    """
    _check(split)
    if style not in ("natural", "hint"):
        raise ValueError(f"unknown style {style!r}")
    if not prefs:
        raise ValueError("an instruction needs at least one preference")
    names = list(prefs)
    rng.shuffle(names)
    if style == "hint":
        parts = []
        for name in names:
            shape, text = ask(name, prefs[name], rng, split, wrap=False)
            forms = [f for f in HINTS[split] if ("{vp}" in f.lower()) == (shape == "vp")]
            form = rng.choice(forms)
            parts.append(form.format(vp=text, Vp=capitalise(text), free=text,
                                     Free=capitalise(text)))
        return _typos(" ".join(parts), rng, typos)
    text = _joined([ask(n, prefs[n], rng, split)[1] for n in names], rng, split)
    if rng.random() < 0.25:
        reason = rng.choice(REASONS[split])
        text += rng.choice(BECAUSE[split]).format(r=reason, R=capitalise(reason))
    if rng.random() < 0.2:
        filler = rng.choice(FILLERS[split])
        text = f"{filler}, {text}" if rng.random() < 0.5 else f"{text}, {filler}"
    return _typos(capitalise(text) + rng.choice((".", "!", ".", "")), rng, typos)


def correction(unmet: Mapping[str, str], met: Mapping[str, str], rng: random.Random,
               split: Split = "train", *, typos: float = 0.15) -> str:
    """What a user says to a reply that missed ``unmet`` (attribute -> wanted value): an
    opening now and then, an ask for each, maybe a reason, then the ``met`` preferences
    restated so that a hint never pulls them back to their defaults."""
    if not unmet:
        raise ValueError("a correction needs something unmet")
    text = instruction(unmet, rng, split, typos=0.0).rstrip(".!")
    if rng.random() < 0.7:
        lead = rng.choice(LEADS[split])
        text = f"{lead} {text if lead.endswith('.') else _lower_first(text)}"
    if met:
        names = list(met)
        rng.shuffle(names)
        keeps = [ask(n, met[n], rng, split, wrap=False)[1] for n in names]
        text += rng.choice(RESTATES[split]) + _joined(keeps, rng, split)
    return _typos(text + ".", rng, typos)


def thanks(rng: random.Random, split: Split = "train") -> str:
    _check(split)
    return rng.choice(THANKS[split])


def _joined(parts: Sequence[str], rng: random.Random, split: Split) -> str:
    text = parts[0]
    for part in parts[1:]:
        join = rng.choice(JOINS[split])
        text += join + (capitalise(part) if join.rstrip().endswith((".", ":")) else part)
    return text


_TYPO_WORD = re.compile(r"[A-Za-z]{4,}")


def _typos(text: str, rng: random.Random, rate: float) -> str:
    """Now and then (``rate`` of the time) one word of four letters or more gets a typo:
    two letters swapped, one dropped or one doubled."""
    words = list(_TYPO_WORD.finditer(text))
    if rate <= 0 or not words or rng.random() >= rate:
        return text
    match = rng.choice(words)
    word, i = match.group(), rng.randrange(1, len(match.group()) - 1)
    kind = rng.randrange(3)
    new = (word[:i] + word[i + 1] + word[i] + word[i + 2:] if kind == 0
           else word[:i] + word[i + 1:] if kind == 1 else word[:i] + word[i] + word[i:])
    return text[:match.start()] + new + text[match.end():]


def capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if not text.startswith("I ") and \
        not text.startswith("I'") else text


# --- the split, as data ----------------------------------------------------------------------


def parts(split: Split) -> Iterator[str]:
    """Every template and word of ``split`` (asks with their slots, lexemes, wrappers,
    joins, leads, reasons, fillers, restates, hint forms, thanks)."""
    _check(split)
    for table in ASKS.values():
        for template in table[split]:
            yield template.split(":", 1)[1]
    for table in LEXEMES.values():
        yield from table[split]
    for table in (WRAPPERS, JOINS, LEADS, REASONS, BECAUSE, FILLERS, RESTATES, HINTS, THANKS):
        yield from table[split]


_WORDS = re.compile(r"[a-z][a-z'-]*")


def content_words(text: str) -> set[str]:
    """The words of ``text`` that are not function words nor slot names."""
    text = re.sub(r"\{[A-Za-z-]+\}", " ", text.lower().replace("\u2019", "'"))
    words = set()
    for word in _WORDS.findall(text):
        for piece in [word, *word.split("-")]:
            piece = piece.strip("'-")
            if piece and piece not in FUNCTION_WORDS:
                words.add(piece)
    return words


def vocabulary(split: Split) -> set[str]:
    """The content words of every part of ``split``."""
    return set().union(*(content_words(p) for p in parts(split)))


def sample_prefs(rng: random.Random) -> dict[str, str]:
    """1-4 attributes, each with a value picked 50/50 (as pretraining draws them)."""
    return random_prefs(rng, rng.randint(1, len(ATTRIBUTES)))
