"""Learning curves: what each adapter version did, one row per version (learner -> store
-> the dashboard's curves page; a benchmark run -> store).

A version's row in the registry carries its training step's numbers (loss, KL, clip
fraction, tokens/s, the reward of its batch); this adds what happened after it was
published: the traffic it served (turns, how many were judged, their mean reward), and
the scores a benchmark gave it where a run records them (`record_score`). Versions that
never served (refused, failed, abandoned, staged) and forgotten ones are not on a curve.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Any

from sqlalchemy import and_, func, select

from nextstate.core.lora import PUBLISHED
from nextstate.core.store.database import Database
from nextstate.core.store.schema import adapters, judgments, scores, turns

BASE_ADAPTER = "@base"  # a score of ``<policy>@base``: the base model before any step


class Curves:
    def __init__(self, db: Database) -> None:
        self.db = db

    def versions(self, policies: Collection[str] | None = None,
                 tenant: str | None = None) -> list[dict[str, Any]]:
        """Every published version (of ``policies``), oldest first, with its step's numbers
        (``stats``) and the traffic it served (``served``: turns, judged, mean reward;
        ``tenant``'s traffic only, when given)."""
        query = (select(adapters.c.version, adapters.c.name, adapters.c.policy,
                        adapters.c.status, adapters.c.published_at, adapters.c.stats)
                 .where(adapters.c.status.in_([str(s) for s in PUBLISHED]))
                 .order_by(adapters.c.version))
        if policies is not None:
            query = query.where(adapters.c.policy.in_(list(policies)))
        with self.db.connect() as conn:
            rows = [{str(k): v for k, v in row._mapping.items()} for row in conn.execute(query)]
        served = self.served(tenant)
        empty = {"turns": 0, "judged": 0, "reward_mean": None}
        return [{**row, "stats": row["stats"] or {}, "served": served.get(row["name"], empty)}
                for row in rows]

    def served(self, tenant: str | None = None) -> dict[str, dict[str, Any]]:
        """The answered main turns each model or adapter served: how many, how many were
        judged, and their mean reward, by the name that served them."""
        judged = and_(judgments.c.turn_id == turns.c.id, judgments.c.status == "ok")
        query = (select(turns.c.served_model, func.count(turns.c.id),
                        func.count(judgments.c.turn_id), func.avg(judgments.c.score))
                 .select_from(turns.outerjoin(judgments, judged))
                 .where(turns.c.turn_type == "main", turns.c.status == "ok",
                        turns.c.served_model.is_not(None))
                 .group_by(turns.c.served_model))
        if tenant is not None:
            query = query.where(turns.c.tenant == tenant)
        with self.db.connect() as conn:
            return {str(row[0]): {"turns": int(row[1]), "judged": int(row[2]),
                                  "reward_mean": float(row[3]) if row[3] is not None else None}
                    for row in conn.execute(query)}

    def record_score(self, policy: str, adapter: str, benchmark: str, score: float,
                     at: float | None = None) -> None:
        """A benchmark's score of ``adapter`` (a version's name, or ``<policy>@base``)."""
        with self.db.begin() as conn:
            conn.execute(scores.insert().values(
                policy=policy, adapter=adapter, benchmark=benchmark, score=float(score),
                created_at=time.time() if at is None else at))

    def scores(self, policies: Collection[str] | None = None) -> list[dict[str, Any]]:
        """Every recorded score (of ``policies``), oldest first."""
        query = select(scores.c.policy, scores.c.adapter, scores.c.benchmark, scores.c.score,
                       scores.c.created_at).order_by(scores.c.created_at, scores.c.id)
        if policies is not None:
            query = query.where(scores.c.policy.in_(list(policies)))
        with self.db.connect() as conn:
            return [{str(k): v for k, v in row._mapping.items()} for row in conn.execute(query)]
