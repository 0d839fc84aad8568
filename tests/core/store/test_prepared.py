"""The store's write path on prepared statements (SQLite and PostgreSQL): rows identical to
SQLAlchemy's own, defaults filled, driver errors raised as SQLAlchemy's (so that the
recorder spools while the store is locked)."""

import sqlite3

import pytest
from sqlalchemy import bindparam, select, text, update
from sqlalchemy.exc import DBAPIError, OperationalError

from nextstate.core.store import Store
from nextstate.core.store.prepared import Prepared
from nextstate.core.store.schema import sessions, turns
from tests.core.store.test_store import chat_turn


@pytest.fixture
def store(store_url):
    s = Store(store_url)
    s.db.ensure_schema()
    yield s
    s.close()


def _row(turn_id: str) -> dict:
    return {"id": turn_id, "session_id": "s", "turn_index": 0, "turn_type": "main",
            "endpoint": "chat", "status": "ok", "created_at": 1.5, "next_state_status": "n/a",
            "request": {"messages": [{"role": "user", "content": "hé \"quoted\""}]},
            "response": {"choices": [], "usage": None}, "prompt_token_ids": None,
            "logprobs": [-0.5, -1.0], "user": "u"}


def test_rows_are_stored_exactly_as_sqlalchemy_stores_them(store):
    row = _row("ours")
    with store.db.engine.begin() as conn:
        Prepared(turns.insert(), conn.dialect, tuple(row)).run(conn, row)
        conn.execute(turns.insert(), {**_row("theirs")})
    with store.db.engine.connect() as conn:
        raw = {r.id: r._asdict() for r in conn.execute(text("SELECT * FROM turns"))}
        nulls = conn.execute(text(
            "SELECT id FROM turns WHERE prompt_token_ids IS NULL OR next_state IS NULL"
        )).scalars().all()
    assert {k: v for k, v in raw["ours"].items() if k != "id"} == {
        k: v for k, v in raw["theirs"].items() if k != "id"}
    assert raw["ours"]["redacted"] in (False, 0)  # the column's default
    assert sorted(nulls) == ["ours", "theirs"]
    assert store.turns.get("ours")["request"] == row["request"]


def test_selects_and_updates_read_and_write_like_sqlalchemy(store):
    with store.db.engine.begin() as conn:
        conn.execute(sessions.insert(), {"id": "s", "created_at": 1.0, "updated_at": 1.0,
                                         "turn_count": 2, "done": False})
        find = Prepared(select(sessions).where(sessions.c.id == bindparam("id")), conn.dialect)
        found = find.first(conn, {"id": "s"})
        assert (found.turn_count, found.done, found.tenant) == (2, False, None)
        assert find.first(conn, {"id": "nope"}) is None
        touch = Prepared(update(sessions).where(sessions.c.id == bindparam("b_id")),
                         conn.dialect, ("turn_count", "done"))
        assert touch.run(conn, {"b_id": "s", "turn_count": 3, "done": True}) == 1
        assert find.first(conn, {"id": "s"})[3:6] == (3, None, True)


def test_a_locked_store_raises_sqlalchemy_errors_and_rolls_back(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/s.db", busy_timeout=0.05)
    store.turns.write([chat_turn([{"role": "user", "content": "hi"}], "hello")])
    lock = sqlite3.connect(tmp_path / "s.db")
    lock.execute("BEGIN EXCLUSIVE")
    with pytest.raises(OperationalError) as caught:
        store.turns.write([chat_turn([{"role": "user", "content": "again"}], "hello")])
    assert isinstance(caught.value, DBAPIError) and "locked" in str(caught.value)
    lock.rollback()
    assert store.turns.write([chat_turn([{"role": "user", "content": "later"}], "hi")]) == 1
    assert store.turns.count() == 2
    store.close()
