"""Finding the store a command points at, before it reads from it
(nextstate status / export / adapters / forget -> store).

The proxy and the learner create their store on first use. A command that only reads
must not: a store that is not there (a new shell without ``NEXTSTATE_HOME``, a mistyped
``--store``) is a mistake to name in one sentence, with the way to point at another,
rather than an empty SQLite file made on the spot or a driver's traceback.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

HOW_TO_POINT = ("point at another with --store URL or NEXTSTATE_STORE, or set "
                "NEXTSTATE_HOME to the data dir the proxy used")


class StoreNotFound(Exception):
    """The store a command was pointed at is not there, or cannot be read."""


def shown(url: str) -> str:
    """The URL as messages show it: any password masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def check_url(url: str) -> None:
    """Raise `StoreNotFound` unless ``url`` is a database URL whose driver is installed
    (nothing is connected to: a store that is down is the spool's business)."""
    try:
        parsed = make_url(url)
        parsed.get_dialect().import_dbapi()
    except ArgumentError as exc:
        raise StoreNotFound(f"{url!r} is not a database URL (e.g. sqlite:////path/to/"
                            "nextstate.db or postgresql+psycopg://user@host/db)") from exc
    except (ImportError, SQLAlchemyError) as exc:
        raise StoreNotFound(f"{shown(url)} needs a database driver that is not installed "
                            f"({exc}); for PostgreSQL: pip install 'nextstate[postgres]' "
                            "and a postgresql+psycopg:// URL") from exc


def require_store(url: str) -> None:
    """Raise `StoreNotFound` unless ``url`` names a store that nextstate has written to."""
    check_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database
        if not path or path == ":memory:":
            raise StoreNotFound(f"{url} is an in-memory database: nothing is recorded "
                                f"there; {HOW_TO_POINT}")
        if not Path(path).is_file():
            raise StoreNotFound(f"no store at {url} (no such file): nothing has been "
                                f"recorded there yet; {HOW_TO_POINT}")
    engine = None
    try:
        engine = create_engine(url)
        with engine.connect() as conn:
            found = inspect(conn).has_table("turns")
    except (SQLAlchemyError, ImportError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:300]
        raise StoreNotFound(f"the store at {shown(url)} cannot be read ({reason}); "
                            f"{HOW_TO_POINT}") from exc
    finally:
        if engine is not None:
            engine.dispose()
    if not found:
        raise StoreNotFound(f"the database at {shown(url)} holds no nextstate store: nothing "
                            f"has been recorded there yet; {HOW_TO_POINT}")
