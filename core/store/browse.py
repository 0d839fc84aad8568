"""Browsing the recorded sessions: a searchable list, and one session with what the
learner made of each turn (proxy -> store -> the dashboard's sessions pages).

The list is one GROUP BY over the turns (newest activity first), filtered by tenant and
by a search that matches a session's id, its user, the model that served it, or any text
of its requests, replies and next states (case-insensitive, the same on SQLite and
PostgreSQL). A session is its turns in the export format (`Turns.iterate`), each with its
judgment (`Judgments.for_turns`) minus the teacher logprobs, which a page asks for one
turn at a time (`tokens`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import String, and_, case, func, or_, select

from nextstate.core.store.database import Database
from nextstate.core.store.judgments import Judgments
from nextstate.core.store.schema import judgments, turns
from nextstate.core.store.turns import Turns

PREVIEW = 120  # characters of a session's opening shown in the list


def _opening(request: Any) -> str:
    """What a session's first turn asked: its last user message (or prompt), shortened."""
    text: Any = ""
    if isinstance(request, dict):
        messages = request.get("messages")
        if isinstance(messages, list):
            users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
            text = users[-1].get("content") if users else ""
        else:
            text = request.get("prompt", "")
    if isinstance(text, list):  # content parts: the text ones
        text = " ".join(p.get("text", "") for p in text if isinstance(p, dict))
    words = " ".join(str(text or "").split())
    return words if len(words) <= PREVIEW else words[:PREVIEW - 1] + "…"


def _matching(query: str) -> Any:
    """Turns where ``query`` appears (ids, user, model, or any text they carry)."""
    text = [turns.c.session_id, turns.c.id, turns.c.user, turns.c.served_model,
            turns.c.request.cast(String), turns.c.response.cast(String),
            turns.c.next_state.cast(String)]
    return or_(*(column.icontains(query, autoescape=True) for column in text))


class Browse:
    def __init__(self, db: Database, turns_: Turns, judgments_: Judgments) -> None:
        self.db = db
        self.turns = turns_
        self.judgments = judgments_

    def sessions(self, *, tenant: str | None = None, query: str = "", limit: int = 50,
                 offset: int = 0) -> dict[str, Any]:
        """Sessions (``tenant``'s, when given) that match ``query``, most recently active
        first: {"total", "sessions": [{id, opening (what its first turn asked), turns,
        main_turns, started_at, last_at, user, tenant, served_model, judged,
        reward_mean}]}."""
        where: list[Any] = []
        if tenant is not None:
            where.append(turns.c.tenant == tenant)
        if query:
            where.append(turns.c.session_id.in_(
                select(turns.c.session_id).where(*where, _matching(query))))
        judged = and_(judgments.c.turn_id == turns.c.id, judgments.c.status == "ok")
        last = func.max(func.coalesce(turns.c.finished_at, turns.c.created_at))
        rows_query = (
            select(turns.c.session_id, func.count(turns.c.id).label("turns"),
                   func.sum(case((turns.c.turn_type == "main", 1), else_=0)).label("main"),
                   func.min(turns.c.created_at).label("started_at"), last.label("last_at"),
                   func.max(turns.c.user).label("user"), func.max(turns.c.tenant).label("tenant"),
                   func.max(turns.c.served_model).label("served_model"),
                   func.count(judgments.c.turn_id).label("judged"),
                   func.avg(judgments.c.score).label("reward_mean"))
            .select_from(turns.outerjoin(judgments, judged)).where(*where)
            .group_by(turns.c.session_id).order_by(last.desc(), turns.c.session_id)
            .limit(limit).offset(offset))
        total_query = select(func.count(func.distinct(turns.c.session_id))).where(*where)
        with self.db.connect() as conn:
            total = int(conn.execute(total_query).scalar_one())
            rows = conn.execute(rows_query).all()
            openings = {row.session_id: _opening(row.request) for row in conn.execute(
                select(turns.c.session_id, turns.c.request).where(
                    turns.c.session_id.in_([r.session_id for r in rows]),
                    turns.c.turn_index == 0))} if rows else {}
        return {"total": total, "sessions": [{
            "id": row.session_id, "opening": openings.get(row.session_id, ""),
            "turns": int(row.turns), "main_turns": int(row.main or 0),
            "started_at": row.started_at, "last_at": row.last_at, "user": row.user,
            "tenant": row.tenant, "served_model": row.served_model, "judged": int(row.judged),
            "reward_mean": float(row.reward_mean) if row.reward_mean is not None else None,
        } for row in rows]}

    def users(self, tenant: str) -> list[str]:
        """The users whose turns ``tenant`` recorded (whose personal adapters it may see)."""
        with self.db.connect() as conn:
            return sorted(row.user for row in conn.execute(
                select(turns.c.user).where(turns.c.tenant == tenant, turns.c.user.is_not(None))
                .distinct()))

    def session(self, session_id: str, *, tenant: str | None = None,
                ) -> list[dict[str, Any]] | None:
        """The session's turns, oldest first, each with its ``judgment`` (None when not
        judged yet; teacher logprobs left out) and ``teacher_hints`` (how many hints have
        teacher logprobs); None when there is no such session (for this tenant)."""
        found = list(self.turns.iterate(session_id=session_id, tenant=tenant))
        if not found:
            return None
        verdicts = self.judgments.for_turns([t["turn_id"] for t in found])
        for turn in found:
            verdict = verdicts.get(turn["turn_id"])
            teachers = (verdict or {}).pop("teacher_logprobs", None) or []
            turn["judgment"] = verdict
            turn["teacher_hints"] = sum(1 for t in teachers if t)
        return found

    def tokens(self, turn_id: str, *, tenant: str | None = None) -> dict[str, Any] | None:
        """One turn's completion tokens with the sampler's logprobs and, where
        distillation scored them, the teacher's under each hint; None when there is no
        such turn (for this tenant)."""
        turn = self.turns.get(turn_id)
        if turn is None or (tenant is not None and turn["tenant"] != tenant):
            return None
        verdict = self.judgments.for_turns([turn_id]).get(turn_id) or {}
        return {"turn_id": turn_id, "model": turn["model"],
                "served_model": turn["served_model"],
                "token_ids": turn["completion_token_ids"] or [],
                "logprobs": turn["logprobs"] or [],
                "hints": verdict.get("hints") or [],
                "teacher_logprobs": verdict.get("teacher_logprobs") or [],
                "untrainable": turn["untrainable"]}
