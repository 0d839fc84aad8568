"""What the learner is doing, as it last reported it (learner -> store -> proxy's
``GET /v1/learner/status``, ``nextstate status``).

One row per learner process, overwritten each time it reports: the learner and the
proxy are separate processes that share nothing but the store.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select, update

from nextstate.core.store.database import Database
from nextstate.core.store.schema import learner_status


class LearnerStatus:
    def __init__(self, db: Database) -> None:
        self.db = db

    def read(self) -> dict[str, Any] | None:
        """What the learner last reported, and when."""
        with self.db.connect() as conn:
            row = conn.execute(select(learner_status).order_by(learner_status.c.id)).first()
        if row is None:
            return None
        return {"updated_at": row.updated_at, "age_seconds": time.time() - row.updated_at,
                **row.status}

    def write(self, status: dict[str, Any], learner_id: int = 0) -> None:
        now = time.time()
        with self.db.begin() as conn:
            changed = conn.execute(update(learner_status).where(learner_status.c.id == learner_id)
                                   .values(updated_at=now, status=status)).rowcount
            if not changed:
                conn.execute(learner_status.insert().values(id=learner_id, updated_at=now,
                                                            status=status))
