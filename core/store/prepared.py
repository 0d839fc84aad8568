"""Statements compiled once and run on the driver's cursor: the store's hot write path.

proxy -> recorder -> `Store.write` -> **prepared statements** -> SQLite / PostgreSQL.
The writer runs a handful of statements a turn in a thread of the proxy's own process,
so each one's cost is paid on the proxy's core. SQLAlchemy builds, caches and wraps
every statement it executes (~80 µs for a one-row lookup built per call, ~30 µs
prebuilt); the driver itself takes ~9 µs. Here a Core statement is compiled once for
the engine's dialect, so that quoting, parameter style and type casts are SQLAlchemy's,
and run on the DBAPI cursor of the connection SQLAlchemy opened, inside its transaction.
Values go through the column types' own bind processors (JSON is serialised exactly as
SQLAlchemy would, ``None`` included) and driver errors come out as SQLAlchemy's
`DBAPIError` subclasses (a lost connection is invalidated), so that callers see what
`Connection.execute` would have given them.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from sqlalchemy import Connection, Dialect, Table
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement, Insert, Select

Processor = Callable[[Any], Any]
_REQUIRED = object()


class Prepared:
    """One statement compiled for one dialect.

    ``column_keys``: the columns an insert sets (or an update's SET clause), each from the
    parameter of the same name. Parameters missing from a call take the statement's own
    literal values (``LIMIT 1``, ``status = 'pending'``); an insert's other columns with
    a scalar default take the default.
    """

    def __init__(self, statement: ClauseElement, dialect: Dialect,
                 column_keys: Sequence[str] | None = None) -> None:
        defaults: dict[str, Any] = {}
        if isinstance(statement, Insert) and column_keys is not None:
            table = statement.table
            assert isinstance(table, Table)
            for column in table.columns:
                if column.key not in column_keys and column.default is not None:
                    if not column.default.is_scalar:
                        raise ValueError(f"{table.name}.{column.key}: only scalar defaults")
                    defaults[column.key] = column.default.arg
            column_keys = [*column_keys, *defaults]
        compiled = statement.compile(dialect=dialect, column_keys=column_keys)
        assert isinstance(compiled, SQLCompiler)
        self.sql = compiled.string
        by_name = {name: bind for bind, name in compiled.bind_names.items()}
        order = list(compiled.positiontup or []) if compiled.positional else list(by_name)
        self.positional = compiled.positional
        self.names = order
        self.fixed: dict[str, Any] = {}
        self.processors: dict[str, Processor] = {}
        for name in order:
            bind = by_name[name]
            if name in defaults:
                self.fixed[name] = defaults[name]
            elif not bind.required:
                self.fixed[name] = bind.effective_value
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self.processors[name] = processor
        self._plan = [(name, self.processors.get(name), self.fixed.get(name, _REQUIRED))
                      for name in order]
        self.row: Callable[..., Any] | None = None
        self.columns: list[Any] = []
        self.results: list[Processor | None] | None = None  # known once a row is read
        if isinstance(statement, Select):
            self.columns = list(statement.selected_columns)
            self.row = namedtuple("Row", [c.key for c in self.columns], rename=True)  # type: ignore[misc]
        self.dialect = dialect
        self._dbapi_error: type[Exception] = dialect.loaded_dbapi.Error

    def params(self, values: Mapping[str, Any]) -> Any:
        out = []
        for name, processor, fixed in self._plan:
            value = values.get(name, fixed)
            if value is _REQUIRED:
                raise KeyError(f"no value for parameter {name!r} of {self.sql!r}")
            out.append(value if processor is None else processor(value))
        return tuple(out) if self.positional else dict(zip(self.names, out, strict=True))

    def run(self, conn: Connection, values: Mapping[str, Any]) -> int:
        """Run it once; returns how many rows it changed."""
        cursor = self._run(conn, False, self.params(values))
        count = int(cursor.rowcount)
        cursor.close()
        return count

    def runmany(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        if rows:
            self._run(conn, True, [self.params(row) for row in rows]).close()

    def first(self, conn: Connection, values: Mapping[str, Any]) -> Any:
        """The first row of a select (attributes named as its columns), or None."""
        assert self.row is not None, "first() is for selects"
        cursor = self._run(conn, False, self.params(values))
        found = cursor.fetchone()
        if found is not None and self.results is None:  # the driver's types, as SQLAlchemy
            self.results = [c.type.dialect_impl(self.dialect).result_processor(
                self.dialect, d[1]) for c, d in zip(self.columns, cursor.description, strict=True)]
        cursor.close()
        if found is None:
            return None
        assert self.results is not None
        return self.row(*(v if p is None else p(v)
                          for v, p in zip(found, self.results, strict=True)))

    def _run(self, conn: Connection, many: bool, params: Any) -> Any:
        dbapi_conn = conn.connection
        cursor = dbapi_conn.cursor()
        try:
            if many:
                cursor.executemany(self.sql, params)
            else:
                cursor.execute(self.sql, params)
        except self._dbapi_error as exc:
            lost = conn.dialect.is_disconnect(cast(Any, exc), dbapi_conn, cursor)
            if lost:
                conn.invalidate(exc)
            raise DBAPIError.instance(self.sql, params, exc, self._dbapi_error,
                                      connection_invalidated=lost,
                                      dialect=conn.dialect) from exc
        return cursor
