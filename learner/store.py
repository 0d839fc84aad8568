"""The learner's side of the store (store -> learner -> store).

The proxy writes turns; the learner reads the ones that have their next state, and
writes back what it learned about them: judgments (with teacher logprobs) now, trained
adapters later. Everything the learner knows lives in the store, so a learner killed at
any moment picks up where it was: a turn is judged exactly once because its judgment row
is written in the same transaction that marks it done.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, func, or_, select, update

from nextstate.learner.judgment import Judgment
from nextstate.proxy.store import Store
from nextstate.proxy.store.schema import feedback, judgments, learner_status, turns


class LearnerStore:
    def __init__(self, url: str) -> None:
        self.store = Store(url)
        self.engine = self.store.engine

    def close(self) -> None:
        self.store.close()

    def to_judge(self, limit: int, *, max_attempts: int = 5, retry_after: float = 30.0,
                 now: float | None = None) -> list[dict[str, Any]]:
        """Main turns that have their next state (or ended without one) and no judgment
        yet; failed ones again after ``retry_after`` seconds, up to ``max_attempts``;
        judged ones again when feedback arrived after their judgment."""
        self.store._ready()
        now = time.time() if now is None else now
        latest_feedback = (select(func.max(feedback.c.created_at))
                           .where(feedback.c.turn_id == turns.c.id).scalar_subquery())
        query = (
            select(turns.c.id)
            .outerjoin(judgments, judgments.c.turn_id == turns.c.id)
            .where(turns.c.turn_type == "main", turns.c.status == "ok",
                   turns.c.next_state_status.in_(("paired", "none")))
            .where(or_(
                judgments.c.turn_id.is_(None),
                and_(judgments.c.status == "error", judgments.c.attempts < max_attempts,
                     judgments.c.updated_at < now - retry_after),
                and_(judgments.c.status == "ok", latest_feedback > judgments.c.updated_at),
            ))
            .order_by(turns.c.created_at)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            ids = [row.id for row in conn.execute(query)]
        return list(self.store.turns(ids=ids)) if ids else []

    def save_judgment(self, turn_id: str, judgment: Judgment,
                      teacher_logprobs: Sequence[Sequence[float]] | None = None,
                      teacher_model: str | None = None) -> None:
        now = time.time()
        values = {
            "status": "ok", "score": judgment.score, "source": judgment.source,
            "votes": list(judgment.votes), "texts": list(judgment.texts),
            "hints": list(judgment.hints), "judge": judgment.judge,
            "prompt_version": judgment.prompt_version,
            "teacher_logprobs": [list(t) for t in teacher_logprobs or []],
            "teacher_model": teacher_model, "error": None, "updated_at": now,
        }
        self._upsert(turn_id, values, now)

    def save_error(self, turn_id: str, reason: str) -> None:
        now = time.time()
        self._upsert(turn_id, {"status": "error", "error": reason[:2000], "updated_at": now},
                     now, count_attempt=True)

    def _upsert(self, turn_id: str, values: dict[str, Any], now: float,
                count_attempt: bool = False) -> None:
        with self.engine.begin() as conn:
            row = conn.execute(select(judgments.c.attempts)
                               .where(judgments.c.turn_id == turn_id)).first()
            attempts = (row.attempts if row is not None else 0) + (1 if count_attempt else 0)
            if row is None:
                conn.execute(judgments.insert().values(
                    turn_id=turn_id, created_at=now, attempts=attempts, **values))
            else:
                conn.execute(update(judgments).where(judgments.c.turn_id == turn_id)
                             .values(attempts=attempts, **values))

    def judgment(self, turn_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(judgments).where(judgments.c.turn_id == turn_id)).first()
        return {str(k): v for k, v in row._mapping.items()} if row is not None else None

    def counts(self) -> dict[str, int]:
        """Where turns are in the pipeline."""
        self.store._ready()
        with self.engine.connect() as conn:
            def count(*where: Any) -> int:
                query = select(func.count()).select_from(
                    turns.outerjoin(judgments, judgments.c.turn_id == turns.c.id)).where(*where)
                return int(conn.execute(query).scalar_one())

            main_ok = (turns.c.turn_type == "main", turns.c.status == "ok")
            return {
                "recorded": count(),
                "awaiting_next_state": count(*main_ok, turns.c.next_state_status == "pending"),
                "awaiting_judgment": count(
                    *main_ok, turns.c.next_state_status.in_(("paired", "none")),
                    or_(judgments.c.turn_id.is_(None), judgments.c.status == "error")),
                "judged": count(judgments.c.status == "ok"),
                "judge_errors": count(judgments.c.status == "error"),
            }

    def write_status(self, status: dict[str, Any], learner_id: int = 0) -> None:
        now = time.time()
        with self.engine.begin() as conn:
            changed = conn.execute(update(learner_status).where(learner_status.c.id == learner_id)
                                   .values(updated_at=now, status=status)).rowcount
            if not changed:
                conn.execute(learner_status.insert().values(id=learner_id, updated_at=now,
                                                            status=status))
