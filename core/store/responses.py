"""Responses kept in the store, for ``previous_response_id`` (proxy -> store -> proxy).

A turn recorded from ``/v1/responses`` with ``store`` not false carries, in its
``dialect`` column, the expanded request and the Responses object the client got; a
``turn_keys`` row maps the response id to the turn (`index_response`, written by the
recorder's writer with the turn itself). Another proxy process, or this one after a
restart, finds the response there (`Responses.find`); the proxy's memory of recent
ones is in `nextstate.proxy.dialects.kept`. Lookups are scoped to the tenant. Forgetting
the turn forgets its response (its key row goes with it). A kept request's images come
back inline (the store keeps references, images.py): the proxy forwards them again.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, and_, select

from nextstate.core.records import TurnRecord
from nextstate.core.store.database import Database
from nextstate.core.store.images import Images
from nextstate.core.store.rows import same_tenant
from nextstate.core.store.schema import turn_keys, turns


def index_response(conn: Connection, rec: TurnRecord) -> None:
    """The store's half of keeping: the response id names its turn (the writer thread)."""
    dialect = rec.dialect or {}
    response = dialect.get("response")
    if rec.endpoint != "responses" or not dialect.get("store") or rec.status != "ok" \
            or not isinstance(response, dict) or not isinstance(response.get("id"), str):
        return
    conn.execute(turn_keys.insert().values(key=response["id"], turn_id=rec.turn_id, choice=0,
                                           created_at=rec.created_at))


class Responses:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.images = Images(db)

    def find(self, tenant: str | None, response_id: str) -> dict[str, Any] | None:
        """The kept turn's dialect ({"request", "response", "store"}), or None."""
        with self.db.connect() as conn:
            row = conn.execute(select(turns.c.dialect).join(
                turn_keys, turn_keys.c.turn_id == turns.c.id).where(
                turn_keys.c.key == response_id, same_tenant(tenant)).limit(1)).first()
            dialect = row.dialect if row is not None else None
            return self.images.inline(dialect, conn) if isinstance(dialect, dict) else None

    def unindex(self, tenant: str | None, response_id: str) -> None:
        """Forget the id (the turn stays recorded: its turn is the operator's record)."""
        with self.db.begin() as conn:
            mine = select(turns.c.id).where(same_tenant(tenant)).scalar_subquery()
            conn.execute(turn_keys.delete().where(and_(turn_keys.c.key == response_id,
                                                       turn_keys.c.turn_id.in_(mine))))
