"""From judgments to lessons, and back (store -> learner -> judge -> **lessons** -> store ->
the proxy's memory).

After a turn is judged (judging.py calls `Keeper.after`, on a thread):

- its hints become lessons of the turn owner's scope (a user's, a tenant's, shared), or
  join a lesson that already says the same (core/store/lessons.py merges and redacts);
  the situation they were learned in (the message the hint corrected) goes with them, so
  that the proxy finds them for requests like it;
- if the proxy served the turn with lessons, the turn's score counts for each of them:
  +1 marks them useful now; a lesson whose last ``drop_after`` served turns were all
  corrected (-1) is dropped: it keeps failing, and costs context on every request.

Retiring lessons the weights have learned is `retirement.py`'s; handing a user's lessons
over to the weights once they no longer help is `handover.py`'s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from nextstate.core.sessions import text_of
from nextstate.core.store import Lessons
from nextstate.learner.config import MemoryConfig
from nextstate.learner.judgment import Judgment

log = logging.getLogger("nextstate.learner.lessons")


@dataclass
class Kept:
    """What one judgment did to the memory."""

    learned: int = 0  # new lessons
    merged: int = 0  # hints that joined a lesson
    dropped: int = 0  # lessons dropped now


def situation(turn: dict[str, Any]) -> str:
    """What a lesson was learned on: the text of the turn's last user message (its
    prompt's end for completions)."""
    request = turn.get("request") or {}
    if turn.get("endpoint") == "completions":
        return str(request.get("prompt") or "")[-500:]
    for message in reversed(request.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return text_of(message.get("content"))[-500:]
    return ""


def served_ids(turn: dict[str, Any]) -> list[str]:
    lessons = turn.get("lessons")
    ids = lessons.get("ids") if isinstance(lessons, dict) else None
    return [str(i) for i in ids] if isinstance(ids, list) else []


class Keeper:
    """Keeps the store's lessons in step with the judgments."""

    def __init__(self, lessons: Lessons, config: MemoryConfig) -> None:
        self.lessons = lessons
        self.config = config

    def after(self, turn: dict[str, Any], judgment: Judgment) -> Kept:
        kept = Kept()
        served = served_ids(turn)
        if served and judgment.source != "none":
            dropped = self.lessons.record_served(served, turn["turn_id"], judgment.score,
                                                 drop_after=self.config.drop_after)
            kept.dropped = len(dropped)
            for lesson_id in dropped:
                log.info("lesson %s dropped: its last %d served turns were corrected",
                         lesson_id, self.config.drop_after)
        if self.config.learn:
            origin = "feedback" if judgment.source == "feedback" else "judge"
            for hint in judgment.hints[: self.config.lessons_per_turn]:
                learned = self.lessons.learn(
                    hint, tenant=turn.get("tenant"), user=turn.get("user"),
                    turn_id=turn["turn_id"], context=situation(turn), origin=origin)
                if learned is not None:
                    kept.learned += learned[1]
                    kept.merged += not learned[1]
        return kept
