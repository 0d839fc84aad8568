"""Turns: the write path of the recorder and the reads of export and the learner
(proxy -> recorder -> Turns.write; nextstate export / the learner -> Turns.iterate).

Records are written in order, in one transaction a batch, by the recorder's worker
thread (never the request path). Session state lives here, not in a proxy's memory, so a
session whose turns reach different proxy processes is still paired correctly: a turn
finds its session by id or by the conversation it continues, and gives the session's
previous turn its next state. Writes are idempotent by record id: a batch replayed from
the journal is never duplicated. The statements are compiled once and run on the
driver's cursor (prepared.py); stored text is scrubbed (redact.py). Inline images are
stored once and referenced from the turn's JSON (images.py); a next state that carries a
screenshot holds its reference like any other content part.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy import Connection, bindparam, func, select, update

from nextstate.core.records import (
    TO_RECOMPUTE,
    Assembled,
    FeedbackRecord,
    NextStateRecord,
    Record,
    TurnRecord,
    assemble,
)
from nextstate.core.redact import Redactor
from nextstate.core.sessions import (
    conversation_key,
    last_assistant_index,
    next_state_kind,
)
from nextstate.core.store import feedback as feedback_rows
from nextstate.core.store.database import Database
from nextstate.core.store.images import Images, references
from nextstate.core.store.responses import index_response
from nextstate.core.store.rows import (
    export_query,
    export_row,
    next_state,
    same_tenant,
    turn_row,
)
from nextstate.core.store.schema import sessions, turn_keys, turns


def _opening_key(rec: TurnRecord) -> str | None:
    """The conversation a chat request without a session id continues: the key of its
    messages up to the last reply (what that reply's turn was indexed under)."""
    messages = rec.request.get("messages")
    if rec.session_id or rec.endpoint == "completions" or not isinstance(messages, list):
        return None
    i = last_assistant_index(messages)
    return None if i is None else conversation_key(messages[: i + 1])


class Turns:
    def __init__(self, db: Database, redactor: Redactor | None = None) -> None:
        self.db = db
        self.redactor = redactor if redactor is not None else Redactor()
        self.images = Images(db)

    # -- writing (the recorder's worker thread) ---------------------------------------

    def write(self, records: Sequence[Record]) -> int:
        """Write records in one transaction, in order; returns how many were new."""
        return self.write_or_defer(records)[0]

    def write_or_defer(self, records: Sequence[Record], pairing_wait: float = 0.0,
                       now: float | None = None) -> tuple[int, list[TurnRecord]]:
        """Like `write`, but a turn that continues a conversation whose earlier turn is not
        in the store yet (it may still be on its way from another proxy process) is
        handed back instead of written, for up to ``pairing_wait`` seconds after it
        happened. Returns (written, deferred)."""
        now = time.time() if now is None else now
        written = 0
        deferred: list[TurnRecord] = []
        with self.db.begin() as conn:
            for record in records:
                if isinstance(record, TurnRecord):
                    key = _opening_key(record)
                    if now - record.created_at < pairing_wait and self._parent_missing(
                            conn, record, key):
                        deferred.append(record)
                    else:
                        written += self._write_turn(conn, record, key)
                elif isinstance(record, FeedbackRecord):
                    written += self._write_feedback(conn, record)
                else:
                    written += self._write_next_state(conn, record)
        return written, deferred

    def _parent_missing(self, conn: Connection, rec: TurnRecord, key: str | None) -> bool:
        """Does this turn continue a conversation the store has not seen yet?"""
        if rec.turn_type != "main":
            return False
        if rec.session_id:
            messages = rec.request.get("messages")
            return (rec.endpoint != "completions" and isinstance(messages, list)
                    and last_assistant_index(messages) is not None
                    and self._session(conn, rec.session_id) is None)
        if key is None:
            return False
        return self.db.sql("key_seen", lambda: select(turn_keys.c.turn_id).where(
            turn_keys.c.key == bindparam("key")).limit(1)).first(conn, {"key": key}) is None

    def _write_turn(self, conn: Connection, rec: TurnRecord, key: str | None) -> int:
        if self.db.sql("turn_seen", lambda: select(turns.c.id).where(
                turns.c.id == bindparam("id"))).first(conn, {"id": rec.turn_id}):
            return 0  # replayed from the spool: already stored
        reply = assemble(rec)
        # Images stored once, referenced from here on (before the next state is taken
        # from the request, and before the redactor reads it: it never scans base64).
        rec, hashes = self._with_references(conn, rec)
        session_id, prev_id, session = self._resolve_session(conn, rec, key)
        if rec.feedback is not None:
            last = session.last_main_turn_id if session is not None else None
            feedback_rows.insert(conn, FeedbackRecord(
                feedback_id=f"{rec.turn_id}-fb", created_at=rec.created_at, source="header",
                turn_id=rec.feedback.get("turn_id") or last, session_id=session_id,
                score=rec.feedback["score"], hint=rec.feedback.get("hint"),
                tenant=rec.tenant), self.redactor)
        if prev_id is not None and rec.turn_type == "main":
            self._pair(conn, prev_id, rec.created_at, rec.turn_id, next_state(conn, prev_id, rec))
        row = self._scrubbed(turn_row(rec, reply, session_id, session))
        keys = tuple(row)
        self.db.sql(("insert_turn", keys), turns.insert, keys).run(conn, row)
        self.images.link(conn, rec.turn_id, hashes)
        self._index_replies(conn, rec, reply)
        index_response(conn, rec)
        self._touch_session(conn, rec, session_id, session)
        return 1

    def _with_references(self, conn: Connection, rec: TurnRecord
                         ) -> tuple[TurnRecord, set[str]]:
        """The record with its images stored and referenced, and their hashes. A copy:
        the recorder retries the same record if this transaction fails."""
        request, hashes = self.images.store(conn, rec.request)
        dialect = rec.dialect
        if dialect is not None:
            dialect, more = self.images.store(conn, dialect)
            hashes |= more
        if request is rec.request and dialect is rec.dialect:
            return rec, hashes
        return replace(rec, request=request, dialect=dialect), hashes

    def _scrubbed(self, row: dict[str, Any]) -> dict[str, Any]:
        """The row with secrets masked; token ids dropped if anything was."""
        hits = 0
        for field in ("request", "response", "error", "dialect", "lessons"):
            row[field], n = self.redactor.scrub(row[field])
            hits += n
        if hits:
            row.update(redacted=True, prompt_token_ids=None, completion_token_ids=None,
                       logprobs=None, untrainable="redacted: its token ids were dropped")
        return row

    def _session(self, conn: Connection, session_id: str) -> Any:
        return self.db.sql("session", lambda: select(sessions).where(
            sessions.c.id == bindparam("id"))).first(conn, {"id": session_id})

    def _resolve_session(
        self, conn: Connection, rec: TurnRecord, key: str | None
    ) -> tuple[str, str | None, Any]:
        """(session id, previous pending main turn to pair, existing session row); ``key``:
        the conversation the request continues, if it has no session id (`_opening_key`).

        Sessions never cross tenants: a session id another tenant already uses is kept
        apart under a tenant prefix, and conversation matching looks at the tenant's own
        turns only."""
        if rec.session_id:
            session_id = rec.session_id
            row = self._session(conn, session_id)
            if row is not None and row.tenant != rec.tenant:
                session_id = f"{rec.tenant}:{rec.session_id}"
                row = self._session(conn, session_id)
            prev = row.last_main_turn_id if row is not None else None
            return session_id, prev, row
        if key is not None:
            tenant: Any = None if rec.tenant is None else bindparam("tenant")
            found = self.db.sql(("by_key", rec.tenant is None), lambda: (
                select(turns.c.id, turns.c.session_id, turns.c.next_state_status)
                .join(turn_keys, turn_keys.c.turn_id == turns.c.id)
                .where(turn_keys.c.key == bindparam("key"), same_tenant(tenant))
                .order_by((turns.c.next_state_status == "pending").desc(),
                          turns.c.created_at.desc())
                .limit(1)
            )).first(conn, {"key": key, "tenant": rec.tenant})
            if found is not None:
                row = self._session(conn, found.session_id)
                prev = found.id if found.next_state_status == "pending" else None
                return found.session_id, prev, row
        return uuid.uuid4().hex, None, None

    def _pair(self, conn: Connection, prev_id: str, at: float, next_turn_id: str | None,
              state: list[dict[str, Any]]) -> None:
        """Give a pending turn its next state (a no-op if it already has one)."""
        if not state:
            return
        state, _ = self.redactor.scrub(state)
        # Its screenshots are the next turn's too, but this turn keeps them alive alone
        # should that turn be forgotten first.
        self.images.link(conn, prev_id, references(state))
        self.db.sql("pair", lambda: update(turns).where(
            turns.c.id == bindparam("prev_id"), turns.c.next_state_status == "pending"
        ).values(next_state_status="paired"), ("next_state", "next_state_kind",
                                               "next_state_at", "next_turn_id")).run(
            conn, {"prev_id": prev_id, "next_state": state,
                   "next_state_kind": next_state_kind(state), "next_state_at": at,
                   "next_turn_id": next_turn_id})

    def _target_turn(self, conn: Connection, turn_id: str | None,
                     session_id: str | None) -> str | None:
        if turn_id is not None:
            return turn_id
        row = self._session(conn, session_id) if session_id else None
        return row.last_main_turn_id if row is not None else None

    def _write_feedback(self, conn: Connection, rec: FeedbackRecord) -> int:
        return feedback_rows.write(conn, rec, self.redactor, lambda: self._target_turn(
            conn, rec.turn_id, rec.session_id))

    def _write_next_state(self, conn: Connection, rec: NextStateRecord) -> int:
        target = self._target_turn(conn, rec.turn_id, rec.session_id)
        if target is None:
            return 0
        messages, _ = self.images.store(conn, rec.messages)
        self._pair(conn, target, rec.created_at, None, messages)
        if rec.done:
            conn.execute(update(turns).where(turns.c.id == target,
                                             turns.c.next_state_status == "pending")
                         .values(next_state_status="none"))
        return 1

    def _index_replies(self, conn: Connection, rec: TurnRecord, reply: Assembled) -> None:
        messages = rec.request.get("messages")
        if rec.turn_type != "main" or rec.status != "ok" or not isinstance(messages, list):
            return
        rows = [
            {"key": conversation_key([*messages, c["message"]]), "turn_id": rec.turn_id,
             "choice": c["index"], "created_at": rec.created_at}
            for c in reply.choices if "message" in c
        ]
        if rows:
            self.db.sql("insert_keys", turn_keys.insert, (
                "key", "turn_id", "choice", "created_at")).runmany(conn, rows)

    def _touch_session(self, conn: Connection, rec: TurnRecord, session_id: str,
                       row: Any) -> None:
        now = rec.finished_at or rec.created_at
        becomes_last = rec.turn_type == "main" and rec.status == "ok"
        if row is None:
            new = {"id": session_id, "created_at": rec.created_at, "updated_at": now,
                   "turn_count": 1, "last_main_turn_id": rec.turn_id if becomes_last else None,
                   "done": rec.session_done, "tenant": rec.tenant}
            self.db.sql("insert_session", sessions.insert, tuple(new)).run(conn, new)
            return
        values: dict[str, Any] = {"updated_at": now, "turn_count": row.turn_count + 1,
                                  "done": rec.session_done}
        if becomes_last:
            values["last_main_turn_id"] = rec.turn_id
        self.db.sql(("update_session", becomes_last), lambda: update(sessions).where(
            sessions.c.id == bindparam("session_id")), tuple(values)).run(
            conn, {**values, "session_id": session_id})

    # -- reading (export, learner, tests) -----------------------------------------------

    def iterate(self, session_id: str | None = None, ids: Sequence[str] | None = None,
                tenant: str | None = None, with_images: bool = False,
                ) -> Iterator[dict[str, Any]]:
        """Every turn (of one session, with these ids, of one tenant), oldest first, in
        the export format: images as references, or back inline ``with_images``."""
        query = export_query().order_by(turns.c.created_at, turns.c.turn_index)
        if session_id is not None:
            query = query.where(turns.c.session_id == session_id)
        if tenant is not None:
            query = query.where(turns.c.tenant == tenant)
        if ids is not None:
            query = query.where(turns.c.id.in_(list(ids)))
        with self.db.connect() as conn:
            rows = conn.execute(query.execution_options(yield_per=200))
            for batch in rows.partitions():
                given = feedback_rows.for_turns(conn, [row.id for row in batch])
                for row in batch:
                    turn = export_row(row, given.get(row.id, []))
                    yield self.images.inline(turn, conn) if with_images else turn

    def get(self, turn_id: str) -> dict[str, Any] | None:
        """One turn in the export format, or None."""
        with self.db.connect() as conn:
            row = conn.execute(export_query().where(turns.c.id == turn_id)).first()
            if row is None:
                return None
            return export_row(row, feedback_rows.for_turns(conn, [turn_id]).get(turn_id, []))

    def owner(self, turn_id: str | None = None, session_id: str | None = None,
              ) -> tuple[bool, str | None]:
        """(exists, tenant) of a turn or a session."""
        table, key = (turns, turn_id) if turn_id is not None else (sessions, session_id)
        with self.db.connect() as conn:
            row = conn.execute(select(table.c.tenant).where(table.c.id == key)).first()
        return (row is not None, row.tenant if row is not None else None)

    # -- sampler logprobs the proxy left out (capture.py, "recompute") -------------------

    def to_recompute(self, limit: int = 64) -> list[dict[str, Any]]:
        """Turns waiting for their sampler logprobs, oldest first: id, the model name
        vLLM served them under, prompt and completion token ids."""
        query = (select(turns.c.id, turns.c.served_model, turns.c.prompt_token_ids,
                        turns.c.completion_token_ids)
                 .where(turns.c.untrainable == TO_RECOMPUTE)
                 .order_by(turns.c.created_at).limit(limit))
        with self.db.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def set_sampler_logprobs(self, turn_id: str, logprobs: list[float] | None,
                             problem: str | None = None) -> None:
        """A waiting turn's recomputed logprobs (trainable from now on), or why they could
        not be had (``problem``: the turn stays out of training)."""
        values = ({"logprobs": logprobs, "untrainable": None} if problem is None
                  else {"untrainable": problem[:200]})
        with self.db.begin() as conn:
            conn.execute(update(turns).where(turns.c.id == turn_id,
                                             turns.c.untrainable == TO_RECOMPUTE)
                         .values(**values))

    def count(self) -> int:
        with self.db.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(turns)).scalar_one())
