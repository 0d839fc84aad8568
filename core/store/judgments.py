"""Judgments: the learner's bookkeeping on the turns it reads (store -> learner -> store).

The proxy writes turns; the learner reads the ones that have their next state, and
writes back what it learned about them: a judgment each (score, votes, hints, teacher
logprobs), then which adapter version trained on it. Everything the learner knows lives
in the store, so a learner killed at any moment picks up where it was: a turn is judged
once because its judgment row is what marks it judged, and trained once because the
transaction that publishes an adapter (`AdapterRegistry.publish`) is the one that marks
its turns trained.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

from sqlalchemy import String, and_, func, or_, select, update

from nextstate.core.store.database import Database
from nextstate.core.store.schema import feedback, judgments, sessions, turns
from nextstate.core.store.turns import Turns


class Verdict(Protocol):
    """What the store keeps of a judge's judgment (`nextstate.learner.judgment.Judgment`
    is one)."""

    @property
    def score(self) -> int: ...
    @property
    def source(self) -> str: ...
    @property
    def votes(self) -> Sequence[int | None]: ...
    @property
    def texts(self) -> Sequence[str]: ...
    @property
    def hints(self) -> Sequence[str]: ...
    @property
    def judge(self) -> str: ...
    @property
    def prompt_version(self) -> str: ...


class Judgments:
    def __init__(self, db: Database, turns: Turns) -> None:
        self.db = db
        self.turns = turns

    def to_judge(self, limit: int, *, max_attempts: int = 5, retry_after: float = 30.0,
                 now: float | None = None) -> list[dict[str, Any]]:
        """Main turns that have their next state (or ended without one) and no judgment
        yet; failed ones again after ``retry_after`` seconds, up to ``max_attempts``;
        judged ones again when feedback arrived after their judgment."""
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
        with self.db.connect() as conn:
            ids = [row.id for row in conn.execute(query)]
        return list(self.turns.iterate(ids=ids)) if ids else []

    def save(self, turn_id: str, judgment: Verdict,
             teacher_logprobs: Sequence[Sequence[float]] | None = None,
             teacher_model: str | None = None,
             student_prompt_ids: Sequence[int] | None = None) -> None:
        """A turn's judgment; ``student_prompt_ids``: for a turn served with lessons, its
        prompt without them (the student's side of context distillation)."""
        now = time.time()
        values = {
            "status": "ok", "score": judgment.score, "source": judgment.source,
            "votes": list(judgment.votes), "texts": list(judgment.texts),
            "hints": list(judgment.hints), "judge": judgment.judge,
            "prompt_version": judgment.prompt_version,
            "teacher_logprobs": [list(t) for t in teacher_logprobs or []],
            "teacher_model": teacher_model, "error": None, "updated_at": now,
            "student_prompt_ids": (list(student_prompt_ids)
                                   if student_prompt_ids is not None else None),
        }
        self._upsert(turn_id, values, now)

    def save_error(self, turn_id: str, reason: str) -> None:
        now = time.time()
        self._upsert(turn_id, {"status": "error", "error": reason[:2000], "updated_at": now},
                     now, count_attempt=True)

    def _upsert(self, turn_id: str, values: dict[str, Any], now: float,
                count_attempt: bool = False) -> None:
        with self.db.begin() as conn:
            row = conn.execute(select(judgments.c.attempts)
                               .where(judgments.c.turn_id == turn_id)).first()
            attempts = (row.attempts if row is not None else 0) + (1 if count_attempt else 0)
            if row is None:
                if conn.execute(select(turns.c.id).where(turns.c.id == turn_id)).first() is None:
                    return  # forgotten while it was judged: its hints must not stay behind
                conn.execute(judgments.insert().values(
                    turn_id=turn_id, created_at=now, attempts=attempts, **values))
            else:
                conn.execute(update(judgments).where(judgments.c.turn_id == turn_id)
                             .values(attempts=attempts, **values))

    def get(self, turn_id: str) -> dict[str, Any] | None:
        with self.db.connect() as conn:
            row = conn.execute(select(judgments).where(judgments.c.turn_id == turn_id)).first()
        return {str(k): v for k, v in row._mapping.items()} if row is not None else None

    def counts(self, tenant: str | None = None) -> dict[str, int]:
        """Where turns are in the pipeline (``tenant``'s turns only, when given)."""
        mine = _of_tenant(tenant)
        with self.db.connect() as conn:
            def count(*where: Any) -> int:
                query = select(func.count()).select_from(
                    turns.outerjoin(judgments, judgments.c.turn_id == turns.c.id)).where(
                    *mine, *where)
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

    def untrained(self, method: str, tenant: str | None = None) -> dict[str, int]:
        """Judged turns that no step will take, and why: no signal for ``method`` (a 0
        with no hint), or tokens that are not exactly what vLLM sampled (redacted, a
        router dropped them). Together with the ready, trained and skipped turns they
        make up every judged turn."""
        has_tokens = and_(turns.c.redacted.is_(False), turns.c.untrainable.is_(None))
        query = (select(has_tokens.label("tokens"), func.count())
                 .select_from(judgments.join(turns, turns.c.id == judgments.c.turn_id))
                 .where(*_of_tenant(tenant), judgments.c.status == "ok",
                        judgments.c.trained_version.is_(None))
                 .where(or_(~_signal(method), ~has_tokens))
                 .group_by(has_tokens))
        with self.db.connect() as conn:
            found = {bool(row[0]): int(row[1]) for row in conn.execute(query)}
        return {"no_signal": found.get(True, 0), "untrainable": found.get(False, 0)}

    def for_turns(self, turn_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The judgments of these turns, by turn id (the dashboard's session page)."""
        if not turn_ids:
            return {}
        with self.db.connect() as conn:
            rows = conn.execute(select(judgments).where(judgments.c.turn_id.in_(list(turn_ids))))
            return {row.turn_id: {str(k): v for k, v in row._mapping.items()} for row in rows}

    def trained_by_version(self) -> dict[int, int]:
        """How many turns each adapter version learned from."""
        query = (select(judgments.c.trained_version, func.count())
                 .where(judgments.c.trained_version > 0)
                 .group_by(judgments.c.trained_version))
        with self.db.connect() as conn:
            return {int(row[0]): int(row[1]) for row in conn.execute(query)}

    # -- training ---------------------------------------------------------------------------

    def ready_for_training(self, method: str, limit: int, *, user: str | None = None,
                           personal_after: int | None = None) -> list[dict[str, Any]]:
        """Judged, not yet trained turns that carry a signal for ``method``, oldest first,
        with what the trainer needs (token ids, sampler logprobs, signals, the version
        that served them, the episode's outcome, the prompt without the lessons it was
        served with, the request: its images, by reference). Only ``user``'s turns when
        given;
        with ``personal_after``, only turns of users who have no personal adapter (see
        `personal_users`)."""
        query = (
            select(turns.c.id, turns.c.prompt_token_ids, turns.c.completion_token_ids,
                   turns.c.logprobs, turns.c.served_model, turns.c.session_id,
                   judgments.c.score, judgments.c.votes, judgments.c.hints,
                   judgments.c.teacher_logprobs, judgments.c.student_prompt_ids,
                   sessions.c.outcome, turns.c.request)
            .join(judgments, judgments.c.turn_id == turns.c.id)
            .outerjoin(sessions, sessions.c.id == turns.c.session_id)
            .where(*_ready_for(method))
            .order_by(turns.c.created_at)
            .limit(limit)
        )
        if user is not None:
            query = query.where(turns.c.user == user)
        elif personal_after is not None:
            query = query.where(or_(turns.c.user.is_(None), turns.c.user.not_in(
                _personal_users(method, personal_after))))
        with self.db.connect() as conn:
            return [{str(k): v for k, v in row._mapping.items()} for row in conn.execute(query)]

    def personal_users(self, method: str, min_turns: int) -> list[str]:
        """Users with at least ``min_turns`` judged turns carrying a signal for
        ``method`` (trained or not): from then on their turns train their own adapter."""
        with self.db.connect() as conn:
            return sorted(row.user for row in conn.execute(_personal_users(method, min_turns)))

    def lanes(self, method: str, min_turns: int | None) -> dict[str | None, int]:
        """Turns ready to train on per adapter: {None: the shared one's, user: that
        user's own} (users past ``min_turns``, as `personal_users`; None: no personal
        adapters). A step trains one of them once it has a batch."""
        if min_turns is None:
            return {None: self.ready_count(method)}
        ready = self.ready_by_user(method)
        own = self.personal_users(method, min_turns)
        shared = sum(n for user, n in ready.items() if user not in own)
        return {None: shared, **{user: ready.get(user, 0) for user in own}}

    def ready_by_user(self, method: str) -> dict[str | None, int]:
        """How many turns are ready to train on, per user (None: turns of nobody)."""
        query = (select(turns.c.user, func.count().label("n"))
                 .join(judgments, judgments.c.turn_id == turns.c.id)
                 .where(*_ready_for(method)).group_by(turns.c.user))
        with self.db.connect() as conn:
            return {row.user: int(row.n) for row in conn.execute(query)}

    def skip(self, turn_ids: Sequence[str], reason: str) -> None:
        """Turns that will never be trained on (too stale, refused by the gate)."""
        with self.db.begin() as conn:
            conn.execute(update(judgments).where(judgments.c.turn_id.in_(list(turn_ids)))
                         .values(trained_version=-1, error=reason[:2000]))

    def ready_count(self, method: str, tenant: str | None = None) -> int:
        with self.db.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(_judged(tenant))
                                    .where(*_ready_for(method), *_of_tenant(tenant)))
                       .scalar_one())

    def trained_count(self, tenant: str | None = None) -> int:
        with self.db.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(_judged(tenant))
                                    .where(judgments.c.trained_version > 0,
                                           *_of_tenant(tenant))).scalar_one())

    def reward_stats(self, tenant: str | None = None) -> dict[str, Any]:
        """How judged turns scored, and how many carried hints."""
        mine = _of_tenant(tenant)
        with self.db.connect() as conn:
            rows = conn.execute(select(judgments.c.score, judgments.c.source,
                                       func.count().label("n"))
                                .select_from(_judged(tenant))
                                .where(judgments.c.status == "ok", *mine)
                                .group_by(judgments.c.score, judgments.c.source)).all()
            hinted = conn.execute(select(func.count()).select_from(_judged(tenant))
                                  .where(_has_teacher(), *mine)).scalar_one()
        by_score = {"+1": 0, "0": 0, "-1": 0}
        from_feedback = 0
        for score, source, n in rows:
            by_score[{1: "+1", -1: "-1"}.get(score, "0")] += n
            from_feedback += n if source == "feedback" else 0
        total = sum(by_score.values())
        mean = (by_score["+1"] - by_score["-1"]) / total if total else None
        return {"scores": by_score, "mean": mean, "from_feedback": from_feedback,
                "with_hints": int(hinted)}


def _of_tenant(tenant: str | None) -> tuple[Any, ...]:
    """The condition on turns for one tenant's view (none: every tenant's)."""
    return () if tenant is None else (turns.c.tenant == tenant,)


def _judged(tenant: str | None) -> Any:
    """Judgments, joined to their turns when only one tenant's count."""
    return judgments if tenant is None else judgments.join(
        turns, turns.c.id == judgments.c.turn_id)


def _has_teacher() -> Any:
    # JSON compared as text works alike on SQLite and PostgreSQL.
    column = judgments.c.teacher_logprobs
    return and_(column.is_not(None), column.cast(String).not_in(("[]", "null")))


def _signal(method: str) -> Any:
    """A judged turn counts toward a step of ``method``: a reward for binary RL; a reward
    or a hint otherwise. Distillation learns only from the hinted ones, but a step is the
    same amount of judged traffic for every method (as in the OpenClaw-RL paper), so the
    turns a user was happy with are part of its steps too."""
    has_reward = or_(judgments.c.score.in_((1, -1)), judgments.c.turn_id.in_(
        select(turns.c.id).join(sessions, sessions.c.id == turns.c.session_id)
        .where(sessions.c.outcome.is_not(None))))
    return has_reward if method == "binary" else or_(has_reward, _has_teacher())


def _ready_for(method: str) -> tuple[Any, ...]:
    """Judged, untrained, and carrying the signal ``method`` trains on."""
    # Only turns whose tokens are exactly what vLLM sampled (redacted turns have none).
    has_tokens = judgments.c.turn_id.in_(select(turns.c.id).where(
        turns.c.redacted.is_(False), turns.c.untrainable.is_(None)))
    return (judgments.c.status == "ok", judgments.c.trained_version.is_(None),
            _signal(method), has_tokens)


def _personal_users(method: str, min_turns: int) -> Any:
    """The users with ``min_turns`` judged turns that carry a signal (a query)."""
    return (select(turns.c.user).join(judgments, judgments.c.turn_id == turns.c.id)
            .where(turns.c.user.is_not(None), judgments.c.status == "ok", _signal(method))
            .group_by(turns.c.user).having(func.count() >= min_turns))
