"""Reading a judge's answers: boxed votes, majorities, hindsight hints (judge -> learner).

store -> learner -> judge -> trainer. An LLM judge answers in free text that ends with a
boxed verdict; this module turns those texts into numbers and hints, as pure functions,
so that every judge (and every test) reads answers the same way:

- evaluative answers end with ``\\boxed{1}``, ``\\boxed{-1}`` or ``\\boxed{0}``; only the
  last box counts, because judges often quote the options or change their mind while
  reasoning;
- ``m`` answers are combined by majority; a tie, or no valid vote at all, gives 0;
- hint answers end with ``\\boxed{1}`` plus a hint between ``[HINT_START]`` and
  ``[HINT_END]`` when the next state revealed how the reply could have been better.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

HINT_START = "[HINT_START]"
HINT_END = "[HINT_END]"

_BOX_OPEN = re.compile(r"\\boxed\s*\{")
_VOTE = re.compile(r"\$?\s*([+\-\u2212]?)\s*([01])(?:\.0*)?\s*\$?")
_HINT_BLOCK = re.compile(re.escape(HINT_START) + r"(.*?)" + re.escape(HINT_END), re.DOTALL)
_SPACES = re.compile(r"\s+")


def last_boxed(text: str) -> str | None:
    """The stripped content of the last ``\\boxed{...}`` in ``text``, or None.

    Braces inside the box are matched (``\\boxed{\\text{1}}`` gives ``\\text{1}``). A last
    box that is never closed (an answer cut off by max_tokens) gives None rather than an
    earlier box: the judge had not finished deciding."""
    starts = list(_BOX_OPEN.finditer(text))
    if not starts:
        return None
    begin = starts[-1].end()
    depth = 1
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i].strip()
    return None


def parse_vote(text: str) -> int | None:
    """The vote of one evaluative answer: 1, 0 or -1 from its last box; None if malformed.

    Tolerates what judges actually write: ``+1``, spaces, a unicode minus, ``1.0``,
    ``\\text{-1}``. Anything else in the last box (``2``, ``yes``) is no vote."""
    content = last_boxed(text)
    if content is None:
        return None
    inner = re.fullmatch(r"\\(?:text|mathbf|textbf|mathrm)\s*\{(.*)\}", content, re.DOTALL)
    if inner is not None:
        content = inner.group(1)
    match = _VOTE.fullmatch(content.strip())
    if match is None:
        return None
    sign, digit = match.groups()
    if digit == "0":
        return 0
    return -1 if sign in ("-", "\u2212") else 1


def majority(votes: Iterable[int | None]) -> int:
    """The most frequent valid vote (None is no vote); 0 on a tie or with no valid vote.

    Plurality, not absolute majority: with votes (1, 1, 0, None) the answer is 1. A tie
    between the leaders is treated as the judge not knowing, which is what 0 means."""
    counts = Counter(v for v in votes if v in (1, 0, -1))
    if not counts:
        return 0
    ranked = counts.most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return 0
    return int(ranked[0][0])


def parse_hint(text: str) -> str | None:
    """The hint of one hint answer: accepted only when its last box is 1 and its last
    ``[HINT_START]...[HINT_END]`` block is not blank; returned stripped."""
    blocks = _HINT_BLOCK.findall(text)
    if not blocks:
        return None
    # The verdict is read outside the hint blocks, so a hint that happens to mention a
    # box ("answer with \boxed{...}") cannot change it.
    if parse_vote(_HINT_BLOCK.sub(" ", text)) != 1:
        return None
    hint = str(blocks[-1]).strip()
    return hint or None


def select_hints(answers: Iterable[str], min_chars: int = 10, keep: int = 3) -> tuple[str, ...]:
    """The accepted hints longer than ``min_chars`` characters, longest first, without
    duplicates (compared ignoring case and spacing), at most ``keep`` of them.

    Longest first because, among hints several votes agree are warranted, the longer one
    usually carries the concrete detail (the value, the format, the tool) the short one
    only gestures at; very short ones ("be better") teach nothing."""
    hints: list[str] = []
    seen: set[str] = set()
    for answer in answers:
        hint = parse_hint(answer)
        if hint is None or len(hint) <= min_chars:
            continue
        key = _SPACES.sub(" ", hint).casefold()
        if key not in seen:
            seen.add(key)
            hints.append(hint)
    hints.sort(key=len, reverse=True)  # stable: equal lengths keep the answers' order
    return tuple(hints[:keep])
