"""Handing an asker's lessons over to the weights once they no longer help, and back
(store -> learner -> **hand-over** -> store -> the proxy's memory).

The proxy serves a control share of the recorded requests that lessons fit and an adapter
serves the other way than their asker's mode, and the record says which arm each turn
was in (proxy/memory.py, core/store/handover.py). After each round of judging, for every
asker with such turns judged since the last round, this compares the two arms on the
asker's latest judged turns since their mode began, back to where each arm has
``hand_over_after`` (the same span of time for both):

    lessons -> weights   once the mean score without lessons ≥ the mean score with them,
                         and ≥ ``FLOOR`` (0: approved at least as often as corrected)
    weights -> lessons   once the mean score with lessons > without + ``BACK``

once each arm has at least ``hand_over_after`` turns. A tie goes to the weights (lessons
that do not raise the score cost context on every request), but only above the floor,
where verdicts can show what lessons do (``FLOOR``). Coming back takes a clear
margin: with 8 turns in the rarer arm, a mean of ±1 verdicts moves by ±0.35 by chance
alone, and on the learning benchmark a tie rule both ways flipped a user back and forth
2-4 times in 8 steps (simulated on the runs' own turns: none with this margin), while a
preference the weights lost or never had shows as a difference of about 1 (mostly
corrected without the lessons, mostly not with them). A change of mode counts afresh
from then on: only turns served after it decide the next one.

Retirement (retirement.py) asks of each lesson whether showing it still changes what the
adapter says; this asks of the lessons together whether they still make the replies
better, by the same verdicts the learner trains on. The two disagree on a lesson in words
the model half-understands: showing it keeps changing the replies (it is never retired),
in ways that do not help (it is handed over). With nothing training there is nothing to
hand over to, and no arms to compare: the base model always gets the lessons.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

from nextstate.core.store.handover import LESSONS, WEIGHTS, HandOver
from nextstate.core.store.lessons import scope_label

log = logging.getLogger("nextstate.learner.handover")
BACK = 0.5  # how much better lessons must score to be served again once handed over
# Handed over only when the turns served without lessons are approved at least as often as
# corrected: a turn is corrected whenever one thing in it is wrong, so where most are, a
# lesson that gets one of several things right changes few verdicts, and a tie there says
# nothing of what the lessons do (on the learning benchmark a held-out student was handed
# over at -0.71 without lessons against -0.75 with them while the persona rated the
# replies 0.29 against 0.70, and its score fell to 0.26).
FLOOR = 0.0


class HandOvers:
    """Decides each asker's mode from their judged turns, one round at a time."""

    def __init__(self, handover: HandOver, after: int) -> None:
        self.handover = handover
        self.after = after
        self.checked_at = 0.0  # judged turns from here on are the next round's news
        self.switches: list[dict[str, Any]] = []  # the latest changes of mode, for status

    def check(self, now: float | None = None) -> list[dict[str, Any]]:
        """One round: the askers whose mode changed, with why. Runs on a thread."""
        now = time.time() if now is None else now
        askers = self.handover.askers(self.checked_at)
        self.checked_at = now
        changed = []
        for tenant, user in askers:
            decision = self.decide(tenant, user, now)
            if decision is not None:
                changed.append(decision)
        self.switches = [*self.switches, *changed][-20:]
        return changed

    def decide(self, tenant: str | None, user: str | None,
               now: float) -> dict[str, Any] | None:
        row = self.handover.get(tenant, user)
        current, since = (row["mode"], float(row["since"])) if row else (LESSONS, 0.0)
        arms = self.handover.arms(tenant, user, since, self.after)
        served, held = arms[LESSONS], arms[WEIGHTS]
        if min(len(served), len(held)) < self.after:
            return None
        with_, without = statistics.fmean(served), statistics.fmean(held)
        if current == LESSONS:
            mode = WEIGHTS if without >= max(with_, FLOOR) else LESSONS
        else:
            mode = LESSONS if with_ > without + BACK else WEIGHTS
        figures = {"with": {"turns": len(served), "mean": round(with_, 3)},
                   "without": {"turns": len(held), "mean": round(without, 3)}}
        reason = (f"judged turns served without lessons scored {without:+.2f} on average "
                  f"({len(held)} turns), with them {with_:+.2f} ({len(served)})")
        if current == LESSONS and with_ <= without < FLOOR:
            reason += ("; kept: without lessons most turns are corrected, where a tie says "
                       "nothing of what the lessons do")
        if not self.handover.decide(tenant, user, mode, reason, figures, now):
            return None
        who = scope_label(tenant, user)
        log.info("memory of %s: %s (%s)", who, "handed over to the weights"
                 if mode == WEIGHTS else "lessons served again", reason)
        return {"tenant": tenant, "user": user, "mode": mode, "reason": reason,
                **figures, "at": now}
