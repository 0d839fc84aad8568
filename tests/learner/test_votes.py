"""Reading judge answers: last boxes, votes, majorities and hints (learner.votes)."""

from __future__ import annotations

import pytest

from nextstate.learner.votes import last_boxed, majority, parse_hint, parse_vote, select_hints

REASONED_PLUS = """The user replied "thanks, that's exactly it" and moved on to another
question. The options were \\boxed{1}, \\boxed{-1} or \\boxed{0}; this is clearly positive.

\\boxed{1}"""

CHANGED_MIND = """At first glance the user seems satisfied, so \\boxed{1}?
But they then say "no, I meant Australia": that is a correction of the reply.
Final answer: \\boxed{-1}"""


def test_last_boxed_takes_the_last_box_of_a_reasoned_answer() -> None:
    assert last_boxed(REASONED_PLUS) == "1"
    assert last_boxed(CHANGED_MIND) == "-1"


def test_last_boxed_is_tolerant_of_spacing_and_nested_braces() -> None:
    assert last_boxed("so \\boxed{ +1 }") == "+1"
    assert last_boxed("so \\boxed {-1}") == "-1"
    assert last_boxed("$\\boxed{\\text{0}}$") == "\\text{0}"


def test_last_boxed_without_box_or_with_an_unclosed_last_box_is_none() -> None:
    assert last_boxed("The reply was good. Score: 1") is None
    # Cut off by max_tokens after an earlier box: the judge had not finished deciding.
    assert last_boxed("maybe \\boxed{1} but wait, the tool failed \\boxed{-") is None


@pytest.mark.parametrize(("answer", "vote"), [
    (REASONED_PLUS, 1),
    (CHANGED_MIND, -1),
    ("ambiguous reply: \\boxed{0}", 0),
    ("\\boxed{+1}", 1),
    ("\\boxed{ - 1 }", -1),
    ("\\boxed{\u22121}", -1),  # a unicode minus sign
    ("\\boxed{1.0}", 1),
    ("\\boxed{\\text{-1}}", -1),
    ("\\boxed{-0}", 0),
])
def test_parse_vote_reads_the_last_box(answer: str, vote: int) -> None:
    assert parse_vote(answer) == vote


@pytest.mark.parametrize("answer", [
    "",
    "The user is happy. Score: +1",
    "\\boxed{2}",
    "\\boxed{yes}",
    "\\boxed{}",
    "\\boxed{1 or -1}",
    "I think \\boxed{1}, final: \\boxed{positive}",  # the last box is what counts
    "\\boxed{-1",
])
def test_parse_vote_of_a_malformed_answer_is_none(answer: str) -> None:
    assert parse_vote(answer) is None


@pytest.mark.parametrize(("votes", "score"), [
    ([1, 1, -1], 1),
    ([-1, -1, 1], -1),
    ([1, 0, 0], 0),
    ([1, -1, 0], 0),  # three-way tie
    ([1, 1, -1, -1, 0], 0),  # tie between the leaders
    ([1, None, None], 1),  # one valid vote is a majority of the valid votes
    ([None, -1, None, 1, -1], -1),
    ([None, None, None], 0),
    ([], 0),
])
def test_majority_of_valid_votes_with_ties_giving_zero(votes: list[int | None],
                                                       score: int) -> None:
    assert majority(votes) == score


HINT_UNITS = """The user had to ask again for kilometres, so the reply should have used
metric units from the start.
\\boxed{1}
[HINT_START]
  Give distances in kilometres; this user works in metric units.
[HINT_END]"""


def test_parse_hint_accepts_a_positive_box_with_a_hint_block() -> None:
    expected = "Give distances in kilometres; this user works in metric units."
    assert parse_hint(HINT_UNITS) == expected


@pytest.mark.parametrize("answer", [
    "The reply was fine. \\boxed{-1}",
    "\\boxed{-1}\n[HINT_START]Use metric units throughout.[HINT_END]",  # refused
    "\\boxed{1}\n[HINT_START]   [HINT_END]",  # empty hint
    "\\boxed{1} but no hint block",
    "\\boxed{1}\n[HINT_START]Use metric units, the user is in",  # cut off, never closed
    "[HINT_START]Use metric units throughout.[HINT_END] and no box at all",
])
def test_parse_hint_rejects_refusals_empty_and_unfinished_hints(answer: str) -> None:
    assert parse_hint(answer) is None


def test_a_box_inside_the_hint_does_not_decide_the_verdict() -> None:
    answer = "\\boxed{1}\n[HINT_START]End every answer with \\boxed{-1} when unsure.[HINT_END]"
    assert parse_hint(answer) == "End every answer with \\boxed{-1} when unsure."


def _hint(text: str) -> str:
    return f"Reasoning...\n\\boxed{{1}}\n[HINT_START]{text}[HINT_END]"


def test_select_hints_keeps_long_ones_longest_first_deduplicated() -> None:
    answers = [
        _hint("Be brief."),  # 9 characters: too short to teach anything
        _hint("Answer in one sentence."),
        _hint("Answer in one sentence and give the date in ISO format."),
        _hint("answer in   one sentence."),  # the same hint, other case and spacing
        "The reply was fine. \\boxed{-1}",
        "malformed",
    ]
    assert select_hints(answers) == (
        "Answer in one sentence and give the date in ISO format.",
        "Answer in one sentence.",
    )


def test_select_hints_keeps_at_most_three_and_respects_min_chars() -> None:
    answers = [_hint("x" * n) for n in (11, 30, 20, 25, 10)]
    assert select_hints(answers) == ("x" * 30, "x" * 25, "x" * 20)
    assert select_hints(answers, min_chars=24, keep=5) == ("x" * 30, "x" * 25)
    assert select_hints([]) == ()
