"""Feedback rows: scores and hints that users give about turns (proxy -> store -> learner).

Feedback arrives three ways, all through the recorder: a header on a later request
(written with that request's turn, `Turns`), ``POST /v1/feedback`` and framework
adapters (a `FeedbackRecord` of its own). Feedback naming a session rather than a turn
is about that session's last main turn; feedback for a whole session without a turn is
the episode's outcome. Free text is scrubbed like the turns' own. The export and the
judge read a turn's feedback with the turn (`for_turns`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, select, update

from nextstate.core.records import FeedbackRecord
from nextstate.core.redact import Redactor
from nextstate.core.store.schema import feedback, sessions

COLUMNS = ("id", "turn_id", "score", "hint", "comment", "source", "created_at")


def insert(conn: Connection, rec: FeedbackRecord, redactor: Redactor) -> None:
    hint, _ = redactor.scrub(rec.hint)
    comment, _ = redactor.scrub(rec.comment)
    conn.execute(feedback.insert().values(
        id=rec.feedback_id, turn_id=rec.turn_id, session_id=rec.session_id,
        score=rec.score, hint=hint, comment=comment, source=rec.source,
        created_at=rec.created_at, tenant=rec.tenant))


def write(conn: Connection, rec: FeedbackRecord, redactor: Redactor,
          target: Callable[[], str | None]) -> int:
    """Write a feedback record once (by its id); ``target``: the turn it is about (its
    own turn id, else its session's last main turn). Returns 1 if new."""
    if conn.execute(select(feedback.c.id).where(feedback.c.id == rec.feedback_id)).first():
        return 0
    if rec.turn_id is None and rec.session_id is not None:
        # Feedback for a whole session is its episode's outcome.
        conn.execute(update(sessions).where(sessions.c.id == rec.session_id)
                     .values(outcome=rec.score))
    rec.turn_id = target()
    insert(conn, rec, redactor)
    return 1


def for_turns(conn: Connection, turn_ids: list[str]) -> dict[str, list[Any]]:
    """The feedback given on each of these turns, oldest first."""
    out: dict[str, list[Any]] = {}
    query = (select(*(feedback.c[c] for c in COLUMNS))
             .where(feedback.c.turn_id.in_(turn_ids)).order_by(feedback.c.created_at))
    for row in conn.execute(query):
        item = {str(k): v for k, v in row._mapping.items()}
        out.setdefault(item.pop("turn_id"), []).append(item)
    return out
