"""What the store says about the loop, for doctor and the learning-health verdict.

store -> `loop_facts` -> `nextstate.core.health` (findings) -> doctor / status. A handful
of GROUP BY queries over the turns, judgments and adapters tables, the same on SQLite and
PostgreSQL; each count is one of the places a turn, a hint or a step can be lost, so
that none is lost silently. ``since`` limits the turns to recent traffic (a fix shows at
once, not after the old turns age out). The dashboard's funnel reads the same facts, for
one tenant's turns or everyone's (`nextstate.core.store.funnel`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, func, select

from nextstate.core.health import LoopFacts
from nextstate.core.lora import AdapterStatus
from nextstate.core.store.schema import adapters, judgments, turns


def loop_facts(engine: Engine, since: float | None = None, tenant: str | None = None,
               ) -> LoopFacts:
    """``tenant``: that tenant's turns only (the adapters' counts are everyone's)."""
    recent: tuple[Any, ...] = (turns.c.created_at >= since,) if since is not None else ()
    if tenant is not None:
        recent = (*recent, turns.c.tenant == tenant)
    with engine.connect() as conn:
        def grouped(*columns: Any, where: tuple[Any, ...] = (), source: Any = turns
                    ) -> list[Any]:
            query = select(*columns, func.count()).select_from(source).where(*where)
            return list(conn.execute(query.group_by(*columns)))

        kinds = {(row[0], row[1]): int(row[2]) for row in grouped(
            turns.c.turn_type, turns.c.status, where=recent)}
        answered = turns.c.status == "ok"
        main = (turns.c.turn_type == "main", answered)
        ends = {row[0]: int(row[1]) for row in grouped(
            turns.c.next_state_status, where=(*recent, *main))}
        untrainable = {str(row[0]): int(row[1]) for row in grouped(
            turns.c.untrainable, where=(*recent, answered, turns.c.untrainable.is_not(None)))}
        session_sizes = select(turns.c.session_id, func.count().label("n")).where(
            *recent, *main).group_by(turns.c.session_id).subquery()
        n_sessions = conn.execute(select(func.count()).select_from(session_sizes)).scalar_one()
        singles = conn.execute(select(func.count()).select_from(session_sizes)
                               .where(session_sizes.c.n == 1)).scalar_one()
        joined = judgments.join(turns, turns.c.id == judgments.c.turn_id)
        judged = {row[0]: int(row[1]) for row in grouped(
            judgments.c.status, where=recent, source=joined)}
        errors = {str(row[0])[:200]: int(row[1]) for row in grouped(
            judgments.c.error, where=(*recent, judgments.c.status == "error"), source=joined)}
        scores = {row[0]: int(row[1]) for row in grouped(
            judgments.c.score, where=(*recent, judgments.c.status == "ok",
                                      judgments.c.source == "judge"), source=joined)}
        corrections = conn.execute(
            select(judgments.c.hints).select_from(joined)
            .where(*recent, judgments.c.status == "ok", judgments.c.score == -1)).all()
        skipped = {str(row[0]): int(row[1]) for row in grouped(
            judgments.c.error, where=(*recent, judgments.c.trained_version == -1),
            source=joined)}
        statuses = {row[0]: int(row[1]) for row in grouped(adapters.c.status,
                                                            source=adapters)}
        failed = tuple(str(row.error) for row in conn.execute(
            select(adapters.c.error).where(adapters.c.status == AdapterStatus.FAILED)
            .order_by(adapters.c.version.desc()).limit(3)))
        current = tuple(row.name for row in conn.execute(
            select(adapters.c.name).where(adapters.c.status == AdapterStatus.CURRENT)))
    return LoopFacts(
        turns=sum(kinds.values()),
        main_turns=kinds.get(("main", "ok"), 0),
        side_turns=kinds.get(("side", "ok"), 0),
        errors=sum(n for (_, status), n in kinds.items() if status != "ok"),
        no_next_state=ends.get("none", 0),
        sessions=int(n_sessions), single_turn_sessions=int(singles),
        untrainable=untrainable,
        judged=judged.get("ok", 0),
        judge_errors=errors,
        votes={_vote(score): n for score, n in scores.items()},
        corrections=len(corrections),
        corrections_without_hint=sum(1 for row in corrections if not row.hints),
        skipped=skipped, adapters=statuses, failed_adapters=failed, current=current,
    )


def _vote(score: int | None) -> str:
    return "none" if score is None else f"{score:+d}" if score else "0"
