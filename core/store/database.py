"""The database under the store: one engine, its tables made on first use, and the write
path's compiled statements (proxy, learner, CLI -> store -> SQLite / PostgreSQL).

Any SQLAlchemy URL works; SQLite runs in WAL mode with a busy timeout. The tables are
created on first use rather than when a `Database` is made, so that a proxy starts while
its store is down. Every concept of the store (turns, the adapter registry, judgments,
retention, the learner's status) goes through one `Database`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import StaticPool

from nextstate.core.store.prepared import Prepared
from nextstate.core.store.schema import add_missing_columns, metadata


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


def _sqlite_pragmas(busy_timeout: float) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        cur.close()

    return on_connect


class Database:
    def __init__(self, url: str, busy_timeout: float = 5.0) -> None:
        self.url = url
        self.engine = make_engine(url, busy_timeout)
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

    def begin(self) -> AbstractContextManager[Connection]:
        """A transaction (committed when the block ends without an exception)."""
        self.ensure_schema()
        return self.engine.begin()

    def connect(self) -> AbstractContextManager[Connection]:
        """A connection for reading."""
        self.ensure_schema()
        return self.engine.connect()

    def sql(self, name: Hashable, build: Callable[[], Any],
            column_keys: Sequence[str] | None = None) -> Prepared:
        """A statement of the write path, compiled once for this database and run on the
        driver's cursor (see prepared.py: ~9 µs a statement rather than ~80)."""
        prepared = self._prepared.get(name)
        if prepared is None:
            prepared = Prepared(build(), self.engine.dialect, column_keys)
            self._prepared[name] = prepared
        return prepared

    def close(self) -> None:
        self.engine.dispose()
