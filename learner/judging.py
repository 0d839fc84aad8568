"""The judging stage (store -> learner -> judge -> store).

Picks turns that have their next state, asks the judge for a score and hindsight hints,
computes teacher logprobs for each hint, and writes one judgment per turn. A turn the
proxy served with lessons also gets its prompt without them (the student's, for context
distillation) and, without a hint, the teacher's logprobs with the lessons alone. With a
`Keeper`, hints become lessons and the lessons served are credited with the turn's score
(lessons.py). It runs concurrently with serving and never touches the proxy's request
path. A judge or teacher failure leaves the turn unjudged with the reason recorded; it is
retried later. Turns come from the store with their images as references; each is read
with its images inline just before it is judged (the judge and the teacher send them
on), so only the turns in flight hold them in memory.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from nextstate.core.store import Judgments
from nextstate.core.store.images import ImageMissing
from nextstate.learner.config import JudgingConfig
from nextstate.learner.judgment import Judge, JudgeError, Judgment
from nextstate.learner.lessons import Keeper
from nextstate.learner.teacher import Teacher, TeacherError, served_hint

log = logging.getLogger("nextstate.learner.judging")


@dataclass
class JudgingReport:
    judged: int = 0
    failed: int = 0
    hints: int = 0
    lessons_learned: int = 0
    lessons_dropped: int = 0
    last_error: str | None = None


async def judge_pending(store: Judgments, judge: Judge, teacher: Teacher | None,
                        config: JudgingConfig = JudgingConfig(),
                        keeper: Keeper | None = None) -> JudgingReport:
    """Judge what is waiting, once; returns what happened."""
    turns = await asyncio.to_thread(store.to_judge, config.batch,
                                    max_attempts=config.max_attempts,
                                    retry_after=config.retry_after)
    report = JudgingReport()
    gate = asyncio.Semaphore(config.concurrency)

    async def one(turn: dict[str, Any]) -> None:
        async with gate:
            try:
                turn = await asyncio.to_thread(store.turns.images.inline, turn)
                judgment, teacher_logprobs, student = await _judge_turn(turn, judge, teacher,
                                                                        config)
            except (JudgeError, TeacherError, ImageMissing) as exc:
                reason = f"{type(exc).__name__}: {exc}"
                await asyncio.to_thread(store.save_error, turn["turn_id"], reason)
                report.failed += 1
                report.last_error = reason
                log.warning("turn %s not judged: %s", turn["turn_id"], reason)
                return
            await asyncio.to_thread(store.save, turn["turn_id"], judgment,
                                    teacher_logprobs,
                                    teacher.model_for(turn) if teacher else None, student)
            report.judged += 1
            report.hints += len(judgment.hints)
            if keeper is not None:
                kept = await asyncio.to_thread(keeper.after, turn, judgment)
                report.lessons_learned += kept.learned
                report.lessons_dropped += kept.dropped

    await asyncio.gather(*(one(t) for t in turns))
    return report


async def _judge_turn(turn: dict[str, Any], judge: Judge, teacher: Teacher | None,
                      config: JudgingConfig
                      ) -> tuple[Judgment, list[list[float]], list[int] | None]:
    if turn["next_state_status"] == "none" and not turn.get("feedback"):
        # No next state, no feedback: nothing to learn from, nothing to ask a judge.
        return Judgment(score=0, judge=judge.name, prompt_version=judge.prompt_version,
                        source="none"), [], None
    judgment = await judge.judge(turn)
    teacher_logprobs = []
    student = None
    if teacher is not None and turn.get("completion_token_ids") and teacher.scores(turn):
        for hint in judgment.hints[: config.max_hints]:
            teacher_logprobs.append(await teacher.logprobs(turn, hint))
        if served_hint(turn) is not None:
            # Served with lessons: the teacher saw them (joined by the hints above), the
            # student learns without them.
            student = await teacher.student_prompt_ids(turn)
            if not teacher_logprobs:
                teacher_logprobs.append(await teacher.logprobs(turn, None))
    return judgment, teacher_logprobs, student

