"""The store: where the proxy's records land and where the learner reads them.

proxy -> recorder -> Store.write (a worker thread, never the request path);
nextstate export / the learner -> Store.turns. Any SQLAlchemy URL works; SQLite runs in
WAL mode with a busy timeout. Session state lives here, not in a proxy's memory, so a
session whose turns reach different proxy processes is still paired correctly.
Writes are idempotent by turn id: a batch replayed from the spool is never duplicated.
The writer's statements are compiled once and run on the driver's cursor (prepared.py).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Collection, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import (
    Connection,
    Engine,
    bindparam,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import StaticPool

from nextstate.proxy.dialects.kept import index_response
from nextstate.proxy.record import (
    Assembled,
    FeedbackRecord,
    NextStateRecord,
    Record,
    TurnRecord,
    assemble,
)
from nextstate.proxy.redact import Redactor
from nextstate.proxy.sessions import (
    conversation_key,
    last_assistant_index,
    next_state_kind,
)
from nextstate.proxy.store.prepared import Prepared
from nextstate.proxy.store.rows import (
    export_query,
    export_row,
    next_state,
    same_tenant,
    turn_row,
)
from nextstate.proxy.store.schema import (
    adapters,
    add_missing_columns,
    feedback,
    learner_status,
    metadata,
    sessions,
    turn_keys,
    turns,
)

FEEDBACK_COLUMNS = ("id", "turn_id", "score", "hint", "comment", "source", "created_at")
# Adapter versions that never served, or may never serve again: no rollback to them.
NOT_SERVABLE = ("refused", "failed", "abandoned", "staged", "forgotten")


@dataclass(frozen=True)
class Forgotten:
    """What `Store.forget` deleted."""

    turns: int
    # The personal adapter versions of users forgotten as a whole, now marked
    # ``forgotten``: unloading them from vLLM and deleting their directories is the
    # caller's (or the learner's) job.
    adapters: list[dict[str, Any]]


def make_engine(url: str, busy_timeout: float = 5.0) -> Engine:
    kwargs: dict[str, Any] = {
        "json_serializer": lambda obj: orjson.dumps(obj).decode(),
        "json_deserializer": orjson.loads,
    }
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": busy_timeout, "check_same_thread": False}
        if url in ("sqlite://", "sqlite:///:memory:"):
            kwargs["poolclass"] = StaticPool  # one shared in-memory database
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        event.listen(engine, "connect", _sqlite_pragmas(busy_timeout))
    return engine


def _sqlite_pragmas(busy_timeout: float) -> Any:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        cur.close()

    return on_connect


def _opening_key(rec: TurnRecord) -> str | None:
    """The conversation a chat request without a session id continues: the key of its
    messages up to the last reply (what that reply's turn was indexed under)."""
    messages = rec.request.get("messages")
    if rec.session_id or rec.endpoint == "completions" or not isinstance(messages, list):
        return None
    i = last_assistant_index(messages)
    return None if i is None else conversation_key(messages[: i + 1])


class Store:
    def __init__(self, url: str, *, busy_timeout: float = 5.0,
                 redactor: Redactor | None = None) -> None:
        self.url = url
        self.engine = make_engine(url, busy_timeout)
        self.redactor = redactor if redactor is not None else Redactor()
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self._prepared: dict[Hashable, Prepared] = {}

    def ensure_schema(self) -> None:
        """Create the tables on first use, so that a proxy starts while its store is down."""
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            for attempt in range(5):
                try:
                    metadata.create_all(self.engine)
                    add_missing_columns(self.engine)  # a store made by an older version
                    break
                except DBAPIError:
                    # Another process (or Store) created them between our check and our
                    # CREATE; the next check sees them.
                    if attempt == 4:
                        raise
                    time.sleep(0.05 * (attempt + 1))
            self._schema_ready = True

    def close(self) -> None:
        self.engine.dispose()

    # -- writing (the recorder's worker thread) ---------------------------------------

    def _sql(self, name: Hashable, build: Callable[[], Any],
             column_keys: Sequence[str] | None = None) -> Prepared:
        """A statement of the write path, compiled once for this store's database and run
        on the driver's cursor (see prepared.py: ~9 µs a statement rather than ~80)."""
        prepared = self._prepared.get(name)
        if prepared is None:
            prepared = Prepared(build(), self.engine.dialect, column_keys)
            self._prepared[name] = prepared
        return prepared

    def write(self, records: Sequence[Record]) -> int:
        """Write records in one transaction, in order; returns how many were new."""
        return self.write_or_defer(records)[0]

    def write_or_defer(self, records: Sequence[Record], pairing_wait: float = 0.0,
                       now: float | None = None) -> tuple[int, list[TurnRecord]]:
        """Like `write`, but a turn that continues a conversation whose earlier turn is not
        in the store yet (it may still be on its way from another proxy process) is
        handed back instead of written, for up to ``pairing_wait`` seconds after it
        happened. Returns (written, deferred)."""
        self.ensure_schema()
        now = time.time() if now is None else now
        written = 0
        deferred: list[TurnRecord] = []
        with self.engine.begin() as conn:
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
        return self._sql("key_seen", lambda: select(turn_keys.c.turn_id).where(
            turn_keys.c.key == bindparam("key")).limit(1)).first(conn, {"key": key}) is None

    def _write_turn(self, conn: Connection, rec: TurnRecord, key: str | None) -> int:
        if self._sql("turn_seen", lambda: select(turns.c.id).where(
                turns.c.id == bindparam("id"))).first(conn, {"id": rec.turn_id}):
            return 0  # replayed from the spool: already stored
        reply = assemble(rec)
        session_id, prev_id, session = self._resolve_session(conn, rec, key)
        if rec.feedback is not None:
            last = session.last_main_turn_id if session is not None else None
            self._insert_feedback(conn, FeedbackRecord(
                feedback_id=f"{rec.turn_id}-fb", created_at=rec.created_at, source="header",
                turn_id=rec.feedback.get("turn_id") or last, session_id=session_id,
                score=rec.feedback["score"], hint=rec.feedback.get("hint"),
                tenant=rec.tenant))
        if prev_id is not None and rec.turn_type == "main":
            self._pair(conn, prev_id, rec.created_at, rec.turn_id, next_state(conn, prev_id, rec))
        row = self._scrubbed(turn_row(rec, reply, session_id, session))
        keys = tuple(row)
        self._sql(("insert_turn", keys), turns.insert, keys).run(conn, row)
        self._index_replies(conn, rec, reply)
        index_response(conn, rec)
        self._touch_session(conn, rec, session_id, session)
        return 1

    def _scrubbed(self, row: dict[str, Any]) -> dict[str, Any]:
        """The row with secrets masked; token ids dropped if anything was."""
        hits = 0
        for field in ("request", "response", "error", "dialect"):
            row[field], n = self.redactor.scrub(row[field])
            hits += n
        if hits:
            row.update(redacted=True, prompt_token_ids=None, completion_token_ids=None,
                       logprobs=None, untrainable="redacted: its token ids were dropped")
        return row

    def _session(self, conn: Connection, session_id: str) -> Any:
        return self._sql("session", lambda: select(sessions).where(
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
            found = self._sql(("by_key", rec.tenant is None), lambda: (
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
        self._sql("pair", lambda: update(turns).where(
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

    def _insert_feedback(self, conn: Connection, rec: FeedbackRecord) -> None:
        hint, _ = self.redactor.scrub(rec.hint)
        comment, _ = self.redactor.scrub(rec.comment)
        conn.execute(feedback.insert().values(
            id=rec.feedback_id, turn_id=rec.turn_id, session_id=rec.session_id,
            score=rec.score, hint=hint, comment=comment, source=rec.source,
            created_at=rec.created_at, tenant=rec.tenant))

    def _write_feedback(self, conn: Connection, rec: FeedbackRecord) -> int:
        if conn.execute(select(feedback.c.id).where(feedback.c.id == rec.feedback_id)).first():
            return 0
        if rec.turn_id is None and rec.session_id is not None:
            # Feedback for a whole session is its episode's outcome.
            conn.execute(update(sessions).where(sessions.c.id == rec.session_id)
                         .values(outcome=rec.score))
        rec.turn_id = self._target_turn(conn, rec.turn_id, rec.session_id)
        self._insert_feedback(conn, rec)
        return 1

    def _write_next_state(self, conn: Connection, rec: NextStateRecord) -> int:
        target = self._target_turn(conn, rec.turn_id, rec.session_id)
        if target is None:
            return 0
        self._pair(conn, target, rec.created_at, None, rec.messages)
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
            self._sql("insert_keys", turn_keys.insert, ("key", "turn_id", "choice",
                                                        "created_at")).runmany(conn, rows)

    def _touch_session(self, conn: Connection, rec: TurnRecord, session_id: str,
                       row: Any) -> None:
        now = rec.finished_at or rec.created_at
        becomes_last = rec.turn_type == "main" and rec.status == "ok"
        if row is None:
            new = {"id": session_id, "created_at": rec.created_at, "updated_at": now,
                   "turn_count": 1, "last_main_turn_id": rec.turn_id if becomes_last else None,
                   "done": rec.session_done, "tenant": rec.tenant}
            self._sql("insert_session", sessions.insert, tuple(new)).run(conn, new)
            return
        values: dict[str, Any] = {"updated_at": now, "turn_count": row.turn_count + 1,
                                  "done": rec.session_done}
        if becomes_last:
            values["last_main_turn_id"] = rec.turn_id
        self._sql(("update_session", becomes_last), lambda: update(sessions).where(
            sessions.c.id == bindparam("session_id")), tuple(values)).run(
            conn, {**values, "session_id": session_id})

    def expire_idle(self, idle_seconds: float, now: float | None = None) -> int:
        """End sessions idle for longer than ``idle_seconds``: their last turn gets no
        next state. Returns how many turns were closed."""
        self.ensure_schema()
        cutoff = (now if now is not None else time.time()) - idle_seconds
        with self.engine.begin() as conn:
            closed = conn.execute(
                update(turns)
                .where(turns.c.next_state_status == "pending", turns.c.created_at < cutoff)
                .values(next_state_status="none")
            ).rowcount
            conn.execute(update(sessions)
                         .where(sessions.c.done.is_(False), sessions.c.updated_at < cutoff)
                         .values(done=True))
        return int(closed or 0)

    # -- reading (export, learner, tests) -----------------------------------------------

    def turns(self, session_id: str | None = None, ids: Sequence[str] | None = None,
              tenant: str | None = None) -> Iterator[dict[str, Any]]:
        """Every turn (of one session, with these ids, of one tenant), oldest first, in
        the export format."""
        self.ensure_schema()
        query = export_query().order_by(turns.c.created_at, turns.c.turn_index)
        if session_id is not None:
            query = query.where(turns.c.session_id == session_id)
        if tenant is not None:
            query = query.where(turns.c.tenant == tenant)
        if ids is not None:
            query = query.where(turns.c.id.in_(list(ids)))
        with self.engine.connect() as conn:
            rows = conn.execute(query.execution_options(yield_per=200))
            for batch in rows.partitions():
                given = self._feedback_for(conn, [row.id for row in batch])
                for row in batch:
                    yield export_row(row, given.get(row.id, []))

    def turn(self, turn_id: str) -> dict[str, Any] | None:
        self.ensure_schema()
        with self.engine.connect() as conn:
            row = conn.execute(export_query().where(turns.c.id == turn_id)).first()
            if row is None:
                return None
            return export_row(row, self._feedback_for(conn, [turn_id]).get(turn_id, []))

    def _feedback_for(self, conn: Connection, turn_ids: list[str]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        query = (select(*(feedback.c[c] for c in FEEDBACK_COLUMNS))
                 .where(feedback.c.turn_id.in_(turn_ids)).order_by(feedback.c.created_at))
        for row in conn.execute(query):
            item = {str(k): v for k, v in row._mapping.items()}
            out.setdefault(item.pop("turn_id"), []).append(item)
        return out

    def owner(self, turn_id: str | None = None, session_id: str | None = None,
              ) -> tuple[bool, str | None]:
        """(exists, tenant) of a turn or a session."""
        self.ensure_schema()
        table, key = (turns, turn_id) if turn_id is not None else (sessions, session_id)
        with self.engine.connect() as conn:
            row = conn.execute(select(table.c.tenant).where(table.c.id == key)).first()
        return (row is not None, row.tenant if row is not None else None)

    def current_adapter(self, policy: str) -> tuple[str, str] | None:
        """(name, directory) of the version the learner made current for ``policy``."""
        self.ensure_schema()
        with self.engine.connect() as conn:
            row = conn.execute(select(adapters.c.name, adapters.c.path).where(
                adapters.c.policy == policy, adapters.c.status == "current")).first()
        return (row.name, row.path) if row is not None else None

    def current_adapters(self, policy: str) -> dict[str, tuple[str, str]]:
        """The current version of ``policy`` and of each of its personal policies
        (``<policy>~<user>``), in one query: {policy: (name, directory)}."""
        self.ensure_schema()
        personal = adapters.c.policy.startswith(f"{policy}~", autoescape=True)
        with self.engine.connect() as conn:
            rows = conn.execute(select(adapters.c.policy, adapters.c.name, adapters.c.path)
                                .where(adapters.c.status == "current",
                                       (adapters.c.policy == policy) | personal))
            return {row.policy: (row.name, row.path) for row in rows}

    def learner_status(self) -> dict[str, Any] | None:
        """What the learner last reported, and when."""
        self.ensure_schema()
        with self.engine.connect() as conn:
            row = conn.execute(select(learner_status).order_by(learner_status.c.id)).first()
        if row is None:
            return None
        return {"updated_at": row.updated_at, "age_seconds": time.time() - row.updated_at,
                **row.status}

    # -- retention and administration ------------------------------------------------------

    def forget(self, *, session_id: str | None = None, tenant: str | None = None,
               user: str | None = None, older_than: float | None = None) -> Forgotten:
        """Delete turns (of a session, a tenant, a user, or created before ``older_than``)
        with everything derived from them: conversation keys, feedback, judgments, and
        sessions left empty. A user or a tenant forgotten as a whole (no session, no age)
        also loses the personal adapters trained on their turns: their versions are
        marked ``forgotten`` in the same transaction, so the proxy stops routing to them
        and the learner never loads them again nor starts a step from them."""
        from nextstate.proxy.store.schema import judgments

        self.ensure_schema()
        where = []
        if session_id is not None:
            where.append(turns.c.session_id == session_id)
        if tenant is not None:
            where.append(turns.c.tenant == tenant)
        if user is not None:
            where.append(turns.c.user == user)
        if older_than is not None:
            where.append(turns.c.created_at < older_than)
        if not where:
            raise ValueError("forget what? give a session, a tenant, a user or an age")
        whole = session_id is None and older_than is None
        with self.engine.begin() as conn:
            # Who the doomed turns belonged to, before they go: a user id that cannot name
            # a directory is hashed in its adapter's name, so only the id finds it.
            people: set[str] = set()
            if whole:
                people = {row.user for row in conn.execute(
                    select(turns.c.user).where(*where, turns.c.user.is_not(None)).distinct())}
                people.add(user if user is not None else str(tenant))
            doomed = select(turns.c.id).where(*where).scalar_subquery()
            for table, column in ((turn_keys, turn_keys.c.turn_id),
                                  (feedback, feedback.c.turn_id),
                                  (judgments, judgments.c.turn_id)):
                conn.execute(table.delete().where(column.in_(doomed)))
            deleted = conn.execute(turns.delete().where(*where)).rowcount
            if session_id is not None:
                conn.execute(feedback.delete().where(feedback.c.session_id == session_id))
            if tenant is not None and whole and user is None:
                conn.execute(feedback.delete().where(feedback.c.tenant == tenant))
            conn.execute(sessions.delete().where(~sessions.c.id.in_(
                select(turns.c.session_id).distinct())))
            # After the turns: a learner step that read them fails to publish (see
            # LearnerStore.publish), and one that published already is marked here.
            marked = (self._forget_adapters(conn, people, tenant if user is None else None)
                      if whole else [])
        return Forgotten(int(deleted or 0), marked)

    def _forget_adapters(self, conn: Connection, people: Collection[str],
                         tenant: str | None) -> list[dict[str, Any]]:
        """Mark the personal adapters of ``people``, and of every user of ``tenant``
        (``tenant:id``), forgotten. The rows stay (names only, their directories go):
        version numbers and names are never reused, and a vLLM that was out of reach can
        still be told to unload them."""
        from nextstate.proxy.router import PERSONAL, personal_key

        rows = conn.execute(select(adapters).where(
            adapters.c.policy.contains(PERSONAL, autoescape=True),
            adapters.c.status != "forgotten")).all()
        keys = {personal_key(who) for who in people}

        def theirs(policy: str) -> bool:
            key = policy.rpartition(PERSONAL)[2]  # a user's part never holds "~"
            return key in keys or (tenant is not None and key.startswith(f"{tenant}:"))

        marked = [{str(k): v for k, v in row._mapping.items()}
                  for row in rows if theirs(row.policy)]
        if marked:
            conn.execute(update(adapters).where(adapters.c.version.in_(
                [row["version"] for row in marked])).values(status="forgotten"))
        return [{**row, "status": "forgotten"} for row in marked]

    def adapter_versions(self, policy: str | None = None) -> list[dict[str, Any]]:
        self.ensure_schema()
        query = select(adapters).order_by(adapters.c.version)
        if policy is not None:
            query = query.where(adapters.c.policy == policy)
        with self.engine.connect() as conn:
            return [{str(k): v for k, v in row._mapping.items()} for row in conn.execute(query)]

    def rollback(self, version: int) -> dict[str, Any]:
        """Make an earlier version of its policy current again (loading it into vLLM is
        the caller's job, first). Returns the version's row."""
        self.ensure_schema()
        now = time.time()
        with self.engine.begin() as conn:
            row = conn.execute(select(adapters).where(adapters.c.version == version)).first()
            if row is None or row.status in NOT_SERVABLE:
                raise LookupError(f"no published version {version}")
            conn.execute(update(adapters).where(adapters.c.status == "current",
                                                adapters.c.policy == row.policy)
                         .values(status="previous", retired_at=now))
            conn.execute(update(adapters).where(adapters.c.version == version)
                         .values(status="current", published_at=now))
        return {str(k): v for k, v in row._mapping.items()}

    def count_turns(self) -> int:
        self.ensure_schema()
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(turns)).scalar_one())
