"""What a judge says about one turn (store -> learner -> judge -> store).

A judge looks at a recorded turn (its request, reply and next state) and returns a
`Judgment`: the evaluative score (+1, 0, -1) from a majority of votes, and the hindsight
hints it found (for on-policy distillation). Judges never see the proxy; they get the
turn as exported (`nextstate.core.store.Turns.iterate` rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Judgment:
    score: int  # +1, 0 or -1: the majority of valid votes (0 on a tie or no valid vote)
    votes: tuple[int | None, ...] = ()  # one per judge call; None: the answer had no vote
    texts: tuple[str, ...] = ()  # the judge's answers, verbatim
    hints: tuple[str, ...] = ()  # accepted hindsight hints, best first
    judge: str = ""  # judge name and model, e.g. "rules" or "llm:openai/gpt-4o-mini"
    prompt_version: str = ""
    source: str = "judge"  # judge | feedback (explicit feedback outranked the judge)
    extra: dict[str, Any] = field(default_factory=dict)


class JudgeError(Exception):
    """The judge could not give a judgment this time (down, timed out, only malformed
    answers). The turn stays unjudged, with this reason, and is retried later."""


class Judge(Protocol):
    name: str
    prompt_version: str

    async def judge(self, turn: dict[str, Any]) -> Judgment:
        """Judge one turn (export format). Raises JudgeError when it cannot."""
        ...
