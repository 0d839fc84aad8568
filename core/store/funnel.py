"""The funnel: where the recorded turns are on their way to a training step, and where
and why the others dropped out (proxy -> store -> learner; store -> funnel -> the
dashboard's first page).

Each stage is a subset of the one before it; between two stages, turns are either still
on their way (``waiting``: a next state to come, a judgment to make, a step to fill) or
dropped, with the reason (``drops``)::

    recorded      every turn                     drops: side turns, failed or aborted
    main          answered main turns            waiting: their next state
    judgeable     with a next state, or ended    waiting: the judge; drops: judge errors
    judged        +1 / 0 / -1, hints, feedback   drops: no signal, untrainable tokens
    signal        carry what the method learns   waiting: the next step (ready turns);
                                                 drops: stale, gate refusals, no signal
                                                 in the batch
    trained       an adapter version learned from them

Nothing here counts anew: the counts are the learner's (`Judgments`) and doctor's
(`loop_facts`), for one tenant's turns or everyone's, so the page, ``nextstate status``
and ``nextstate doctor`` can never disagree.
"""

from __future__ import annotations

from typing import Any

from nextstate.core.store.database import Database
from nextstate.core.store.facts import loop_facts
from nextstate.core.store.judgments import Judgments

# How the learner words a skipped turn's reason (training.py), and the funnel's words.
SKIP_REASONS = (("stale", "stale: served too many versions ago"),
                ("publish gate", "refused by the publish gate"),
                ("no ", "no signal in its batch"))


def _drop(reason: str, n: int, detail: dict[str, int] | None = None) -> dict[str, Any]:
    return {"reason": reason, "count": n, "detail": detail or {}}


def _skips(skipped: dict[str, int]) -> list[dict[str, Any]]:
    """The learner's skip reasons (one per refused step, with its KL) by kind."""
    kinds: dict[str, dict[str, int]] = {}
    for reason, n in skipped.items():
        kind = next((label for prefix, label in SKIP_REASONS if reason.startswith(prefix)),
                    "skipped")
        kinds.setdefault(kind, {})[reason] = n
    return [_drop(kind, sum(why.values()), why) for kind, why in kinds.items()]


class Funnel:
    def __init__(self, db: Database, judgments: Judgments) -> None:
        self.db = db
        self.judgments = judgments

    def read(self, *, tenant: str | None = None, method: str = "combined",
             batch_turns: int = 16, personal_after: int | None = None) -> dict[str, Any]:
        """The stages, for ``tenant``'s turns (None: everyone's), and the progress toward
        the next step of ``method`` (`progress`)."""
        self.db.ensure_schema()
        facts = loop_facts(self.db.engine, tenant=tenant)
        counts = self.judgments.counts(tenant)
        rewards = self.judgments.reward_stats(tenant)
        ready = self.judgments.ready_count(method, tenant)  # (this tenant's share)
        trained = self.judgments.trained_count(tenant)
        untrained = self.judgments.untrained(method, tenant)
        judgeable = facts.main_turns - counts["awaiting_next_state"]
        errors = counts["judge_errors"]
        judged = counts["judged"]
        signal = judged - untrained["no_signal"] - untrained["untrainable"]
        stages = [
            {"key": "recorded", "label": "recorded", "count": counts["recorded"],
             "waiting": None,
             "drops": [_drop("side turns (never paired or trained)", facts.side_turns),
                       _drop("failed or aborted", facts.errors)]},
            {"key": "main", "label": "answered main turns", "count": facts.main_turns,
             "waiting": {"label": "awaiting next state",
                         "count": counts["awaiting_next_state"]}, "drops": []},
            {"key": "judgeable", "label": "with a next state, or ended",
             "count": judgeable,
             "waiting": {"label": "awaiting judgment",
                         "count": counts["awaiting_judgment"] - errors},
             "drops": [_drop("judge errors (retried, then given up)", errors,
                             facts.judge_errors)],
             "note": f"{facts.no_next_state} ended without a next state: only feedback "
                     "scores them" if facts.no_next_state else None},
            {"key": "judged", "label": "judged", "count": judged, "waiting": None,
             "drops": [_drop("no signal (0, no hint)", untrained["no_signal"]),
                       _drop("tokens not trainable", untrained["untrainable"],
                             facts.untrainable)],
             "scores": rewards["scores"], "with_hints": rewards["with_hints"],
             "from_feedback": rewards["from_feedback"], "mean": rewards["mean"]},
            {"key": "signal", "label": f"with a {method} signal", "count": signal,
             "waiting": {"label": "ready for the next step", "count": ready},
             "drops": _skips(facts.skipped)},
            {"key": "trained", "label": "trained", "count": trained, "waiting": None,
             "drops": []},
        ]
        return {"stages": stages,
                "progress": self.progress(tenant, method, batch_turns, personal_after)}

    def progress(self, tenant: str | None, method: str, batch_turns: int,
                 personal_after: int | None) -> dict[str, Any]:
        """How close each adapter is to its next step (``batch_turns`` ready turns make
        one): the shared adapter, and with personal adapters (``personal_after``) each
        user's own, a tenant's users only; the fullest decides when the next step comes."""
        sizes = {user: n for user, n in self.judgments.lanes(method, personal_after).items()
                 if user is None or tenant is None or user == tenant
                 or user.startswith(f"{tenant}:")}
        lanes = [{"user": user, "ready": n} for user, n in sizes.items()]
        ready = max(sizes.values())
        return {"ready": ready, "batch_turns": batch_turns, "method": method, "lanes": lanes,
                "fraction": min(1.0, ready / batch_turns) if batch_turns else 0.0}
