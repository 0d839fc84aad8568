"""Lessons: the memory's hints, kept per user, per tenant or shared
(learner -> Lessons.learn; store -> the proxy's memory index -> later prompts;
nextstate memory / the admin endpoints -> list, edit, pin, forget).

A hint the learner got for a turn (from its judge or the user's feedback) becomes a
lesson in the turn owner's scope: a user's own (tenant, user); a tenant's (tenant, None)
for a tenant's turns without a user; shared (None, None) for turns of nobody. A hint
that says what a lesson of the same scope already says (the same words, near enough) is
merged into it: its support grows and the turn joins its sources. Text is scrubbed
(redact.py) before it is stored.

The learner also writes back what each lesson did: every judged turn served with it
(``lesson_turns``, role ``served``, with the turn's score), when it last helped, and its
status. An ``active`` lesson is served; ``retired`` once the weights follow it without
being told (learner/retirement.py); ``dropped`` when turns served with it keep getting
-1. Pinned lessons are served on every request of their scope and never retired or
dropped. Forgetting turns (retention.py) takes the lessons learned only from them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, String, and_, case, delete, exists, func, or_, select, update

from nextstate.core.redact import Redactor
from nextstate.core.retrieval import Scope, similarity, terms
from nextstate.core.store.database import Database
from nextstate.core.store.schema import judgments, lesson_turns, lessons, turns

ACTIVE, RETIRED, DROPPED = "active", "retired", "dropped"
STATUSES = (ACTIVE, RETIRED, DROPPED)
MAX_TEXT = 2000  # characters of a lesson kept (a hint longer than this is cut)


def scope_of(tenant: str | None, user: str | None) -> Scope:
    """The scope of a turn's lessons: its user's, or its tenant's when the turn's owner
    is the tenant itself (no user named), or shared when it has neither."""
    return (tenant, None if user == tenant else user)


def scope_label(tenant: str | None, user: str | None) -> str:
    """A scope as people read it: the user, else "tenant T", else "everyone" (shared)."""
    return user or (f"tenant {tenant}" if tenant else "everyone")


def matched() -> Any:
    """The turns the memory matched lessons to (served with them, or held back): their
    ``lessons`` record is set (JSON null is what an unset one reads as on some drivers)."""
    return and_(turns.c.lessons.is_not(None), turns.c.lessons.cast(String) != "null")


def _row(row: Any) -> dict[str, Any]:
    return {str(k): v for k, v in row._mapping.items()}


class Lessons:
    def __init__(self, db: Database, redactor: Redactor | None = None,
                 merge_similarity: float = 0.7) -> None:
        self.db = db
        self.redactor = redactor if redactor is not None else Redactor()
        self.merge_similarity = merge_similarity

    # -- learning (the learner) --------------------------------------------------------------

    def learn(self, text: str, *, tenant: str | None, user: str | None, turn_id: str | None,
              context: str | None = None, origin: str = "judge",
              now: float | None = None) -> tuple[str, bool] | None:
        """Remember ``text`` for the scope of (tenant, user): merged into a lesson that
        says the same (a retired one serves again: it was needed again), else a new one.
        Returns (its id, whether it is new); None for a hint with nothing left once
        scrubbed."""
        now = time.time() if now is None else now
        text = self._clean(text)
        if not text:
            return None
        context = self._clean(context or "")[:500] or None
        tenant, user = scope_of(tenant, user)
        words = terms(text)
        with self.db.begin() as conn:
            same = self._same_as(conn, tenant, user, text, words)
            if same is not None:
                values: dict[str, Any] = {"support": lessons.c.support + 1, "updated_at": now}
                if same.status == RETIRED:
                    values.update(status=ACTIVE, status_reason="taught again after it "
                                  "was retired", status_at=now)
                conn.execute(update(lessons).where(lessons.c.id == same.id).values(**values))
                lesson_id, new = same.id, False
            else:
                lesson_id, new = uuid.uuid4().hex, True
                conn.execute(lessons.insert().values(
                    id=lesson_id, tenant=tenant, user=user, text=text, context=context,
                    status=ACTIVE, pinned=False, origin=origin, support=1, served=0,
                    helped=0, failed=0, created_at=now, updated_at=now))
            if turn_id is not None:
                self._link(conn, lesson_id, turn_id, "source", None, now)
        return lesson_id, new

    def _clean(self, text: str) -> str:
        scrubbed, _ = self.redactor.scrub(text.strip())
        return str(scrubbed)[:MAX_TEXT].strip()

    def _same_as(self, conn: Connection, tenant: str | None, user: str | None, text: str,
                 words: list[str]) -> Any:
        """The lesson of this scope that says what ``text`` says, if any."""
        rows = conn.execute(select(lessons.c.id, lessons.c.text, lessons.c.status).where(
            _scope_is(tenant, user)).order_by(lessons.c.updated_at.desc()).limit(500)).all()
        best, score = None, 0.0
        for row in rows:
            if row.text.strip().lower() == text.lower():
                return row
            s = similarity(words, terms(row.text))
            if s > score:
                best, score = row, s
        return best if score >= self.merge_similarity else None

    def _link(self, conn: Connection, lesson_id: str, turn_id: str, role: str,
              score: int | None, at: float) -> None:
        key = and_(lesson_turns.c.lesson_id == lesson_id, lesson_turns.c.turn_id == turn_id,
                   lesson_turns.c.role == role)
        if conn.execute(select(lesson_turns.c.at).where(key)).first() is None:
            conn.execute(lesson_turns.insert().values(
                lesson_id=lesson_id, turn_id=turn_id, role=role, score=score, at=at))
        else:
            conn.execute(update(lesson_turns).where(key).values(score=score))

    def record_served(self, lesson_ids: Sequence[str], turn_id: str, score: int, *,
                      drop_after: int = 3, now: float | None = None) -> list[str]:
        """A judged turn that was served with these lessons: its score counts for each of
        them (once per turn, also when it is judged again). A lesson whose last
        ``drop_after`` turns all scored -1 is dropped (never a pinned one); returns the
        ids dropped now."""
        now = time.time() if now is None else now
        dropped = []
        with self.db.begin() as conn:
            for lesson_id in dict.fromkeys(lesson_ids):
                if conn.execute(select(lessons.c.id).where(
                        lessons.c.id == lesson_id)).first() is None:
                    continue  # forgotten meanwhile
                self._link(conn, lesson_id, turn_id, "served", score, now)
                counts = conn.execute(select(
                    func.count(), func.sum(case((lesson_turns.c.score == 1, 1), else_=0)),
                    func.sum(case((lesson_turns.c.score == -1, 1), else_=0)),
                    func.max(lesson_turns.c.at)).where(
                    lesson_turns.c.lesson_id == lesson_id,
                    lesson_turns.c.role == "served")).one()
                values: dict[str, Any] = {"served": counts[0], "helped": counts[1] or 0,
                                          "failed": counts[2] or 0,
                                          "last_served_at": counts[3]}
                if score == 1:
                    values["last_useful_at"] = now
                conn.execute(update(lessons).where(lessons.c.id == lesson_id).values(**values))
                if self._keeps_failing(conn, lesson_id, drop_after):
                    changed = conn.execute(update(lessons).where(
                        lessons.c.id == lesson_id, lessons.c.status == ACTIVE,
                        lessons.c.pinned.is_(False)).values(
                        status=DROPPED, status_at=now,
                        status_reason=f"the last {drop_after} turns served with it were "
                        "corrected (-1)")).rowcount
                    if changed:
                        dropped.append(lesson_id)
        return dropped

    @staticmethod
    def _keeps_failing(conn: Connection, lesson_id: str, drop_after: int) -> bool:
        last = conn.execute(select(lesson_turns.c.score).where(
            lesson_turns.c.lesson_id == lesson_id, lesson_turns.c.role == "served")
            .order_by(lesson_turns.c.at.desc()).limit(drop_after)).scalars().all()
        return len(last) >= drop_after and all(s == -1 for s in last)

    def set_status(self, lesson_id: str, status: str, reason: str | None = None, *,
                   checked: dict[str, Any] | None = None, now: float | None = None) -> bool:
        """Retire, drop or reactivate a lesson (never changes a pinned one's status to
        anything but active)."""
        if status not in STATUSES:
            raise ValueError(f"a lesson's status is one of {', '.join(STATUSES)}")
        now = time.time() if now is None else now
        values: dict[str, Any] = {"status": status, "status_reason": reason,
                                  "status_at": now, "updated_at": now}
        if checked is not None:
            values["checked"] = checked
        where = [lessons.c.id == lesson_id]
        if status != ACTIVE:
            where.append(lessons.c.pinned.is_(False))
        with self.db.begin() as conn:
            return bool(conn.execute(update(lessons).where(*where).values(**values)).rowcount)

    def note_check(self, lesson_id: str, checked: dict[str, Any]) -> None:
        """What a retirement check measured that did not retire the lesson."""
        with self.db.begin() as conn:
            conn.execute(update(lessons).where(lessons.c.id == lesson_id)
                         .values(checked=checked))

    # -- reading (the proxy's index, the learner, the controls) -----------------------------

    def version(self) -> tuple[int, float]:
        """Changes whenever a lesson is added, edited, or changes status: (count, newest
        update), one cheap query for the proxy's poll."""
        with self.db.connect() as conn:
            row = conn.execute(select(func.count(), func.max(lessons.c.updated_at),
                                      func.max(lessons.c.status_at))).one()
        return int(row[0]), max(float(row[1] or 0.0), float(row[2] or 0.0))

    def servable(self, limit: int = 100_000) -> list[dict[str, Any]]:
        """Every lesson the proxy may serve (active; pinned ones whatever their status)."""
        query = (select(lessons.c.id, lessons.c.tenant, lessons.c.user, lessons.c.text,
                        lessons.c.context, lessons.c.pinned, lessons.c.support)
                 .where(or_(lessons.c.status == ACTIVE, lessons.c.pinned.is_(True)))
                 .order_by(lessons.c.updated_at.desc()).limit(limit))
        with self.db.connect() as conn:
            return [_row(r) for r in conn.execute(query)]

    def get(self, lesson_id: str) -> dict[str, Any] | None:
        with self.db.connect() as conn:
            row = conn.execute(select(lessons).where(lessons.c.id == lesson_id)).first()
            if row is None:
                return None
            out = _row(row)
            out["sources"] = list(conn.execute(select(lesson_turns.c.turn_id).where(
                lesson_turns.c.lesson_id == lesson_id, lesson_turns.c.role == "source")
                .order_by(lesson_turns.c.at)).scalars())
        return out

    def find(self, *, tenant: str | None = None, user: str | None = None,
             status: str | None = None, every_tenant: bool = False,
             limit: int = 1000) -> list[dict[str, Any]]:
        """Lessons, newest first: of one tenant (its users' and its own; with
        ``every_tenant``, all), of one user (as the export names them), of one status."""
        query = select(lessons).order_by(lessons.c.updated_at.desc()).limit(limit)
        if not every_tenant:
            query = query.where(lessons.c.tenant.is_(None) if tenant is None
                                else lessons.c.tenant == tenant)
        if user is not None:
            query = query.where(lessons.c.user == user)
        if status is not None:
            query = query.where(lessons.c.status == status)
        with self.db.connect() as conn:
            return [_row(r) for r in conn.execute(query)]

    def add(self, text: str, *, tenant: str | None = None, user: str | None = None,
            pinned: bool = True, now: float | None = None) -> str | None:
        """A lesson written by a person (``nextstate memory add``, the admin endpoint)."""
        now = time.time() if now is None else now
        text = self._clean(text)
        if not text:
            return None
        tenant, user = scope_of(tenant, user)
        lesson_id = uuid.uuid4().hex
        with self.db.begin() as conn:
            conn.execute(lessons.insert().values(
                id=lesson_id, tenant=tenant, user=user, text=text, status=ACTIVE,
                pinned=pinned, origin="manual", support=1, served=0, helped=0, failed=0,
                created_at=now, updated_at=now))
        return lesson_id

    def edit(self, lesson_id: str, *, text: str | None = None, pinned: bool | None = None,
             status: str | None = None, now: float | None = None) -> dict[str, Any] | None:
        """Change a lesson's text, pin, or status (a person's edit); None if it is gone."""
        now = time.time() if now is None else now
        values: dict[str, Any] = {"updated_at": now}
        if text is not None:
            cleaned = self._clean(text)
            if not cleaned:
                raise ValueError("a lesson's text cannot be empty")
            values["text"] = cleaned
        if pinned is not None:
            values["pinned"] = pinned
        if status is not None:
            if status not in STATUSES:
                raise ValueError(f"a lesson's status is one of {', '.join(STATUSES)}")
            values.update(status=status, status_at=now, status_reason="set by hand")
        with self.db.begin() as conn:
            if not conn.execute(update(lessons).where(lessons.c.id == lesson_id)
                                .values(**values)).rowcount:
                return None
        return self.get(lesson_id)

    def forget(self, lesson_id: str) -> bool:
        with self.db.begin() as conn:
            conn.execute(delete(lesson_turns).where(lesson_turns.c.lesson_id == lesson_id))
            return bool(conn.execute(delete(lessons).where(lessons.c.id == lesson_id)).rowcount)

    def counts(self) -> dict[str, int]:
        with self.db.connect() as conn:
            rows = conn.execute(select(lessons.c.status, func.count())
                                .group_by(lessons.c.status)).all()
            pinned = conn.execute(select(func.count()).select_from(lessons)
                                  .where(lessons.c.pinned.is_(True))).scalar_one()
        out = {status: 0 for status in STATUSES}
        out.update({str(status): int(n) for status, n in rows})
        return {**out, "pinned": int(pinned)}

    def events(self, limit: int = 10) -> list[dict[str, Any]]:
        """The latest lessons retired or dropped, newest first, with why."""
        query = (select(lessons.c.id, lessons.c.user, lessons.c.tenant, lessons.c.text,
                        lessons.c.status, lessons.c.status_reason, lessons.c.status_at,
                        lessons.c.served, lessons.c.checked)
                 .where(lessons.c.status.in_((RETIRED, DROPPED)))
                 .order_by(lessons.c.status_at.desc()).limit(limit))
        with self.db.connect() as conn:
            return [{**_row(r), "text": r.text[:200]} for r in conn.execute(query)]

    def to_check(self, limit: int, offset: int = 0) -> list[dict[str, Any]]:
        """Active, unpinned lessons, the least recently checked first (never checked
        first of all), then the most recently served: what a retirement check looks at.
        Never-served ones too: one lesson a request is served, so most of a scope's are
        reserves that a better-matching one outranks, and each is served the moment the
        one above it is retired; checked first, one the weights already follow never
        costs context."""
        checked_at = func.coalesce(lessons.c.checked["at"].as_float(), 0.0)
        query = (select(lessons).where(lessons.c.status == ACTIVE, lessons.c.pinned.is_(False))
                 .order_by(checked_at.asc(),
                           func.coalesce(lessons.c.last_served_at, 0.0).desc(),
                           lessons.c.created_at.desc(), lessons.c.id)
                 .limit(limit).offset(offset))
        with self.db.connect() as conn:
            return [_row(r) for r in conn.execute(query)]

    def held_out(self, tenant: str | None, user: str | None, limit: int,
                 ) -> list[dict[str, Any]]:
        """The scope's latest requests that the memory matched lessons to (served with
        them, or held back) and no adapter has trained on (not judged yet, or judged and
        not trained): prompts to check a lesson on, the kind of request lessons are for.
        Not a request that answers a correction: its prompt ends in what the user just
        asked for, which a lesson drawn from such words only repeats, so showing the
        lesson changes little there, whether or not the model has learned it. A user's
        own turns (in their tenant); for a tenant's lessons, the tenant's; for shared
        ones, any."""
        before, verdict = turns.alias("before"), judgments.alias("verdict")
        answers_a_correction = exists(
            select(before.c.id).join(verdict, verdict.c.turn_id == before.c.id)
            .where(before.c.next_turn_id == turns.c.id, verdict.c.score < 0))
        query = (select(turns.c.id).outerjoin(judgments, judgments.c.turn_id == turns.c.id)
                 .where(turns.c.turn_type == "main", turns.c.status == "ok",
                        turns.c.endpoint != "completions", matched(),
                        judgments.c.trained_version.is_(None), ~answers_a_correction)
                 .order_by(turns.c.created_at.desc()).limit(limit))
        if tenant is not None:
            query = query.where(turns.c.tenant == tenant)
        if user is not None:
            query = query.where(turns.c.user == user)
        with self.db.connect() as conn:
            ids = list(conn.execute(query).scalars())
            rows = conn.execute(select(turns.c.id, turns.c.request, turns.c.user)
                                .where(turns.c.id.in_(ids))).all() if ids else []
        return [_row(r) for r in rows]


def _scope_is(tenant: str | None, user: str | None) -> Any:
    return and_(lessons.c.tenant.is_(None) if tenant is None else lessons.c.tenant == tenant,
                lessons.c.user.is_(None) if user is None else lessons.c.user == user)
