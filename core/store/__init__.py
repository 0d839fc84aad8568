"""The store (proxy -> store -> learner): one database, read and written through one
object per concept, so that no module knows all of them.

    store.turns       Turns: the recorder's writes (turns, sessions, pairing, feedback,
                      next states) and the reads of export and the learner
    store.turns.images Images: each distinct image once, referenced from the turns,
                      inlined back for the learner and export
    store.adapters    AdapterRegistry: every adapter version and which one serves
    store.judgments   Judgments: the learner's bookkeeping on the turns it reads
    store.retention   Retention: forgetting turns (and personal adapters), idle sessions
    store.status      LearnerStatus: what the learner last reported
    store.responses   Responses: Responses objects kept for previous_response_id
    store.funnel      Funnel: where turns are on their way to a step, and why others drop
    store.curves      Curves: what each adapter version did (its step, its traffic, scores)
    store.browse      Browse: the sessions, searchable, and one session turn by turn
    store.lessons     Lessons: the memory's hints, per user, tenant or shared
    store.handover    HandOver: per asker, whether lessons are served or the weights took over

Callers name the concept they use (``store.turns.iterate()``, ``store.adapters.current(p)``).
"""

from __future__ import annotations

from nextstate.core.redact import Redactor
from nextstate.core.store.browse import Browse
from nextstate.core.store.curves import Curves
from nextstate.core.store.database import Database, make_engine
from nextstate.core.store.funnel import Funnel
from nextstate.core.store.handover import HandOver
from nextstate.core.store.judgments import Judgments
from nextstate.core.store.lessons import Lessons
from nextstate.core.store.registry import AdapterRegistry, TurnsForgotten
from nextstate.core.store.responses import Responses
from nextstate.core.store.retention import Forgotten, Retention
from nextstate.core.store.rows import EXPORT_COLUMNS
from nextstate.core.store.status import LearnerStatus
from nextstate.core.store.turns import Turns

__all__ = ["EXPORT_COLUMNS", "AdapterRegistry", "Browse", "Curves", "Database", "Forgotten",
           "Funnel", "HandOver", "Judgments", "LearnerStatus", "Lessons", "Responses", "Retention",
           "Store", "Turns", "TurnsForgotten", "make_engine"]


class Store:
    """One database and the concepts over it. Any SQLAlchemy URL; nothing connects until
    first use (a proxy starts while its store is down)."""

    def __init__(self, url: str, *, busy_timeout: float = 5.0,
                 redactor: Redactor | None = None) -> None:
        self.db = Database(url, busy_timeout)
        self.turns = Turns(self.db, redactor)
        self.adapters = AdapterRegistry(self.db)
        self.judgments = Judgments(self.db, self.turns)
        self.retention = Retention(self.db)
        self.status = LearnerStatus(self.db)
        self.responses = Responses(self.db)
        self.funnel = Funnel(self.db, self.judgments)
        self.curves = Curves(self.db)
        self.browse = Browse(self.db, self.turns, self.judgments)
        self.lessons = Lessons(self.db, self.turns.redactor)
        self.handover = HandOver(self.db)

    @property
    def url(self) -> str:
        return self.db.url

    def close(self) -> None:
        self.db.close()
