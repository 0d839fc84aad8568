"""The hand-over: per asker, whether the memory still serves their lessons or has handed
them over to the weights (proxy -> turns with and without lessons -> learner/handover.py
-> **memory_scopes** -> the proxy's memory).

Retirement (learner/retirement.py) asks of one lesson whether showing it still changes
what the adapter says. That misses a lesson in words the model half-understands: showing
it keeps changing the replies, in ways that do not help. So the memory also measures what
lessons do for the people they are served to. Of the recorded requests that lessons fit
and an adapter serves, the proxy serves a control share the other way
(`MemorySettings.control`), and the record says which arm a turn was in (``lessons.arm``;
``lessons.withheld``: the ids held back). Once those turns are judged, the learner
compares the two arms of each asker and writes the asker's mode here:

    lessons   the default: lessons served, a control share served without them
    weights   handed over: the turns served without lessons scored as well as those
              served with them, so lessons cost context for nothing; served without,
              and a control share with them, so that the learner sees when they would
              help again (a new preference, a user who changed their mind)

Pinned lessons are served in both modes, in both arms (a person asked for them).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, and_, delete, func, select

from nextstate.core.retrieval import Scope
from nextstate.core.store.database import Database
from nextstate.core.store.lessons import Lessons, matched, scope_of
from nextstate.core.store.schema import judgments, memory_scopes, turns

LESSONS, WEIGHTS = "lessons", "weights"
MODES = (LESSONS, WEIGHTS)
ROWS_SCANNED = 2000  # a scope's latest turns with an arm read per decision, at most


def key_of(tenant: str | None, user: str | None) -> str:
    return json.dumps([tenant, user])


def arm_of(record: Any) -> str | None:
    """The arm a turn's ``lessons`` record puts it in: LESSONS (served them), WEIGHTS
    (held them back), None (no choice was made: nothing matched, or only pinned ones)."""
    arm = record.get("arm") if isinstance(record, Mapping) else None
    return arm if arm in MODES else None


class HandOver:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- the proxy --------------------------------------------------------------------------

    def modes(self) -> dict[Scope, str]:
        """Every asker whose mode was decided, and the mode (the others: LESSONS)."""
        with self.db.connect() as conn:
            rows = conn.execute(select(memory_scopes.c.tenant, memory_scopes.c.user,
                                       memory_scopes.c.mode)).all()
        return {(r.tenant, r.user): r.mode for r in rows}

    def count(self, mode: str = WEIGHTS) -> int:
        with self.db.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(memory_scopes)
                                    .where(memory_scopes.c.mode == mode)).scalar_one())

    def version(self) -> tuple[int, float]:
        """Changes whenever a mode changes: (askers decided, the latest change)."""
        with self.db.connect() as conn:
            row = conn.execute(select(func.count(), func.max(memory_scopes.c.since))).one()
        return int(row[0]), float(row[1] or 0.0)

    # -- the learner ------------------------------------------------------------------------

    def get(self, tenant: str | None, user: str | None) -> dict[str, Any] | None:
        tenant, user = scope_of(tenant, user)
        with self.db.connect() as conn:
            row = conn.execute(select(memory_scopes).where(
                memory_scopes.c.key == key_of(tenant, user))).first()
        return None if row is None else {str(k): v for k, v in row._mapping.items()}

    def decide(self, tenant: str | None, user: str | None, mode: str, reason: str,
               figures: dict[str, Any], now: float | None = None) -> bool:
        """Write an asker's mode; returns whether it changed (then it starts now: the
        next decision counts only turns from now on)."""
        if mode not in MODES:
            raise ValueError(f"a memory mode is one of {', '.join(MODES)}")
        now = time.time() if now is None else now
        tenant, user = scope_of(tenant, user)
        key = key_of(tenant, user)
        with self.db.begin() as conn:
            row = conn.execute(select(memory_scopes.c.mode).where(
                memory_scopes.c.key == key)).first()
            changed = (row.mode if row is not None else LESSONS) != mode
            values = {"mode": mode, "reason": reason, "figures": figures, "decided_at": now}
            if changed:
                values["since"] = now
            elif row is None:  # on lessons from the start: every turn so far still counts
                values["since"] = 0.0
            if row is None:
                conn.execute(memory_scopes.insert().values(
                    key=key, tenant=tenant, user=user, **values))
            else:
                conn.execute(memory_scopes.update().where(memory_scopes.c.key == key)
                             .values(**values))
        return changed

    def arms(self, tenant: str | None, user: str | None, since: float,
             each: int) -> dict[str, list[int]]:
        """The judged scores of the asker's turns in each arm, newest first, over one span
        of time for both: from now back to where each arm has ``each`` turns (or to
        ``since``). The control share is the rarer arm, so it sets the span; a span of
        its own per arm would compare today's turns of one with last week's of the other."""
        tenant, user = scope_of(tenant, user)
        query = (select(turns.c.lessons, judgments.c.score)
                 .join(judgments, judgments.c.turn_id == turns.c.id)
                 .where(_with_lessons(), _asked_by(tenant, user),
                        turns.c.created_at >= since, judgments.c.status == "ok",
                        judgments.c.source != "none", judgments.c.score.is_not(None))
                 .order_by(turns.c.created_at.desc()).limit(ROWS_SCANNED))
        out: dict[str, list[int]] = {LESSONS: [], WEIGHTS: []}
        with self.db.connect() as conn:
            for record, score in conn.execute(query):
                arm = arm_of(record)
                if arm is not None:
                    out[arm].append(int(score))
                    if min(len(scores) for scores in out.values()) >= each:
                        break
        return out

    def askers(self, since: float) -> list[Scope]:
        """The askers of the turns judged since ``since`` that lessons were matched to."""
        query = (select(turns.c.tenant, turns.c.user, turns.c.lessons)
                 .join(judgments, judgments.c.turn_id == turns.c.id)
                 .where(_with_lessons(), judgments.c.updated_at >= since)
                 .order_by(judgments.c.updated_at.desc()).limit(ROWS_SCANNED))
        with self.db.connect() as conn:
            rows = conn.execute(query).all()
        return list(dict.fromkeys(scope_of(r.tenant, r.user) for r in rows
                                  if arm_of(r.lessons) is not None))

    def forget(self, tenant: str | None, user: str | None) -> None:
        """A user's mode (a tenant's: its users' too), as if never decided: their memory
        starts over (`nextstate memory forget --user`)."""
        with self.db.begin() as conn:
            forget_modes(conn, tenant, user)

    def handed_over(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The askers whose lessons the weights have taken over, latest first."""
        with self.db.connect() as conn:
            rows = conn.execute(select(memory_scopes).where(memory_scopes.c.mode == WEIGHTS)
                                .order_by(memory_scopes.c.since.desc()).limit(limit)).all()
        return [{str(k): v for k, v in r._mapping.items()} for r in rows]


def memory_version(lessons: Lessons, handover: HandOver) -> list[list[float]]:
    """What the proxy's memory serves from, as JSON reads it: changes whenever a lesson
    or a mode does (the proxy's poll; a client waiting for the proxy to follow)."""
    return [list(lessons.version()), list(handover.version())]


def forget_modes(conn: Connection, tenant: str | None, user: str | None) -> None:
    """Forgetting a user (or a tenant, its users too) forgets their modes (retention.py)."""
    if user is not None:
        conn.execute(delete(memory_scopes).where(memory_scopes.c.user == user))
    elif tenant is not None:
        conn.execute(delete(memory_scopes).where(memory_scopes.c.tenant == tenant))


def _with_lessons() -> Any:
    return and_(matched(), turns.c.turn_type == "main")


def _asked_by(tenant: str | None, user: str | None) -> Any:
    """The turns whose lessons scope is (tenant, user) (see `lessons.scope_of`)."""
    of_tenant = turns.c.tenant.is_(None) if tenant is None else turns.c.tenant == tenant
    if user is not None:
        return and_(of_tenant, turns.c.user == user)
    none = turns.c.user.is_(None)
    return and_(of_tenant, none if tenant is None else (none | (turns.c.user == tenant)))
