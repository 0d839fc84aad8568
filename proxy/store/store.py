"""The store: where the proxy's records land and where the learner reads them.

proxy -> recorder -> Store.write (a worker thread, never the request path);
nextstate export / the learner -> Store.turns. Any SQLAlchemy URL works; SQLite runs in
WAL mode with a busy timeout. Session state lives here, not in a proxy's memory, so a
session whose turns reach different proxy processes is still paired correctly.
Writes are idempotent by turn id: a batch replayed from the spool is never duplicated.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
from sqlalchemy import (
    Connection,
    Engine,
    Row,
    Select,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import StaticPool

from nextstate.proxy.record import Assembled, TurnRecord, assemble
from nextstate.proxy.sessions import (
    conversation_key,
    last_assistant_index,
    next_state_kind,
    next_state_of,
)
from nextstate.proxy.store.schema import metadata, sessions, turn_keys, turns

EXPORT_COLUMNS = (
    "id", "session_id", "turn_index", "turn_type", "endpoint", "status", "http_status",
    "error", "model", "served_model", "created_at", "finished_at", "latency_ms", "ttft_ms",
    "request", "response", "prompt_token_ids", "completion_token_ids", "logprobs",
    "next_state", "next_state_kind", "next_state_status", "next_state_at", "next_turn_id",
)


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


class Store:
    def __init__(self, url: str, *, busy_timeout: float = 5.0) -> None:
        self.url = url
        self.engine = make_engine(url, busy_timeout)
        self._schema_ready = False
        self._schema_lock = threading.Lock()

    def _ready(self) -> None:
        """Create the tables on first use, so that a proxy starts while its store is down."""
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            try:
                metadata.create_all(self.engine)
            except DBAPIError:
                # Another process created them between our check and our CREATE.
                metadata.create_all(self.engine)
            self._schema_ready = True

    def close(self) -> None:
        self.engine.dispose()

    # -- writing (the recorder's worker thread) ---------------------------------------

    def write(self, records: Sequence[TurnRecord]) -> int:
        """Write records in one transaction; returns how many were new."""
        self._ready()
        written = 0
        with self.engine.begin() as conn:
            for record in records:
                written += self._write_one(conn, record)
        return written

    def _write_one(self, conn: Connection, rec: TurnRecord) -> int:
        if conn.execute(select(turns.c.id).where(turns.c.id == rec.turn_id)).first():
            return 0  # replayed from the spool: already stored
        reply = assemble(rec)
        session_id, prev_id, session = self._resolve_session(conn, rec)
        if prev_id is not None and rec.turn_type == "main":
            self._pair(conn, prev_id, rec)
        conn.execute(turns.insert().values(**_turn_row(rec, reply, session_id, session)))
        self._index_replies(conn, rec, reply)
        self._touch_session(conn, rec, session_id, session)
        return 1

    def _resolve_session(
        self, conn: Connection, rec: TurnRecord
    ) -> tuple[str, str | None, Any]:
        """(session id, previous pending main turn to pair, existing session row)."""
        if rec.session_id:
            row = conn.execute(select(sessions).where(sessions.c.id == rec.session_id)).first()
            prev = row.last_main_turn_id if row is not None else None
            return rec.session_id, prev, row
        messages = rec.request.get("messages")
        if rec.endpoint == "chat" and isinstance(messages, list):
            i = last_assistant_index(messages)
            if i is not None:
                key = conversation_key(messages[: i + 1])
                found = conn.execute(
                    select(turns.c.id, turns.c.session_id, turns.c.next_state_status)
                    .join(turn_keys, turn_keys.c.turn_id == turns.c.id)
                    .where(turn_keys.c.key == key)
                    .order_by((turns.c.next_state_status == "pending").desc(),
                              turns.c.created_at.desc())
                    .limit(1)
                ).first()
                if found is not None:
                    row = conn.execute(
                        select(sessions).where(sessions.c.id == found.session_id)
                    ).first()
                    prev = found.id if found.next_state_status == "pending" else None
                    return found.session_id, prev, row
        return uuid.uuid4().hex, None, None

    def _pair(self, conn: Connection, prev_id: str, rec: TurnRecord) -> None:
        prev = conn.execute(
            select(turns.c.request, turns.c.response, turns.c.endpoint)
            .where(turns.c.id == prev_id, turns.c.next_state_status == "pending")
        ).first()
        if prev is None:
            return
        state = _next_state(prev, rec)
        if not state:
            return
        conn.execute(
            update(turns)
            .where(turns.c.id == prev_id, turns.c.next_state_status == "pending")
            .values(next_state=state, next_state_kind=next_state_kind(state),
                    next_state_status="paired", next_state_at=rec.created_at,
                    next_turn_id=rec.turn_id)
        )

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
            conn.execute(turn_keys.insert(), rows)

    def _touch_session(self, conn: Connection, rec: TurnRecord, session_id: str,
                       row: Any) -> None:
        now = rec.finished_at or rec.created_at
        becomes_last = rec.turn_type == "main" and rec.status == "ok"
        if row is None:
            conn.execute(sessions.insert().values(
                id=session_id, created_at=rec.created_at, updated_at=now, turn_count=1,
                last_main_turn_id=rec.turn_id if becomes_last else None,
                done=rec.session_done))
            return
        values: dict[str, Any] = {"updated_at": now, "turn_count": row.turn_count + 1,
                                  "done": rec.session_done}
        if becomes_last:
            values["last_main_turn_id"] = rec.turn_id
        conn.execute(update(sessions).where(sessions.c.id == session_id).values(**values))

    def expire_idle(self, idle_seconds: float, now: float | None = None) -> int:
        """End sessions idle for longer than ``idle_seconds``: their last turn gets no
        next state. Returns how many turns were closed."""
        self._ready()
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

    def turns(self, session_id: str | None = None) -> Iterator[dict[str, Any]]:
        """Every turn (of one session), oldest first, in the export format."""
        self._ready()
        query = _export_query().order_by(turns.c.created_at, turns.c.turn_index)
        if session_id is not None:
            query = query.where(turns.c.session_id == session_id)
        with self.engine.connect() as conn:
            for row in conn.execute(query.execution_options(yield_per=200)):
                yield _export_row(row)

    def turn(self, turn_id: str) -> dict[str, Any] | None:
        self._ready()
        with self.engine.connect() as conn:
            row = conn.execute(_export_query().where(turns.c.id == turn_id)).first()
        return _export_row(row) if row is not None else None

    def count_turns(self) -> int:
        self._ready()
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(turns)).scalar_one())


def _export_query() -> Select[Any]:
    return select(*(turns.c[name] for name in EXPORT_COLUMNS))


def _export_row(row: Row[Any]) -> dict[str, Any]:
    # Column names are SQLAlchemy `quoted_name`s; plain str keys serialise anywhere.
    data = {str(k): v for k, v in row._mapping.items()}
    data["turn_id"] = data.pop("id")
    return data


def _turn_row(rec: TurnRecord, reply: Assembled, session_id: str, session: Any) -> dict[str, Any]:
    if rec.turn_type != "main" or rec.status != "ok":
        ns_status = "n/a"
    elif rec.session_done:
        ns_status = "none"
    else:
        ns_status = "pending"
    finished = rec.finished_at or rec.created_at
    response_choices = []
    for c in reply.choices:
        kept = {k: v for k, v in c.items() if c["index"] != 0 or k not in ("token_ids", "logprobs")}
        response_choices.append(kept)
    return {
        "id": rec.turn_id,
        "session_id": session_id,
        "turn_index": session.turn_count if session is not None else 0,
        "turn_type": rec.turn_type,
        "endpoint": rec.endpoint,
        "status": rec.status,
        "http_status": rec.http_status,
        "error": rec.error or reply.error,
        "model": rec.request.get("model"),
        "served_model": reply.served_model,
        "created_at": rec.created_at,
        "finished_at": finished,
        "latency_ms": round((finished - rec.created_at) * 1000, 3),
        "ttft_ms": rec.ttft_ms,
        "request": rec.request,
        "response": {"choices": response_choices, "usage": reply.usage},
        "prompt_token_ids": reply.prompt_token_ids,
        "completion_token_ids": reply.first("token_ids"),
        "logprobs": reply.first("logprobs"),
        "next_state_status": ns_status,
    }


def _next_state(prev: Any, rec: TurnRecord) -> list[dict[str, Any]]:
    messages = rec.request.get("messages")
    if rec.endpoint == "chat" and isinstance(messages, list):
        return next_state_of(messages)
    prompt = rec.request.get("prompt")
    if not isinstance(prompt, str):
        return []
    # Completions: the next state is what the new prompt adds after the previous
    # prompt and its completion (the whole prompt if it does not extend them).
    before = str(prev.request.get("prompt", "")) if isinstance(prev.request, dict) else ""
    choices = (prev.response or {}).get("choices") or [{}]
    before += str(choices[0].get("text", ""))
    added = prompt[len(before):] if before and prompt.startswith(before) else prompt
    return [{"role": "user", "content": added}] if added else []
