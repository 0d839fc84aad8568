"""The memory on the request path: lessons that fit a request, added to its prompt
(store -> index, off the request path; agent -> proxy -> [lessons] -> vLLM).

The learner turns hints into lessons in the store (core/store/lessons.py). Here an
in-memory BM25 index of every servable lesson (core/retrieval.py) follows the store, as
the router follows adapters: one cheap query a poll, and the index is rebuilt on a
thread only when the lessons changed. For each request it serves, `Memory.serve` finds
the few lessons of the asker's scopes (their own, their tenant's, shared) that fit the
request's last user message, and appends them to that message after the teacher's hint
marker (core/hints.py), so the model is served exactly the context the learner's teacher
scores with. The record keeps the client's request, which lessons were added and where;
the prompt token ids vLLM returns are what the model saw.

Whether lessons still help is measured on the people they are served to, once an adapter
serves them: a control share of the recorded requests they fit (``MemorySettings.control``)
is served the other way than the asker's mode (core/store/handover.py: lessons, or handed
over to the weights), and the record says which arm it was in. Requests not recorded
always get the mode: a turn nobody measures is not worth serving worse. A request the
base model serves always gets its lessons: there are no weights to hand over to (and on
the learning benchmark, memory alone handed over on one lucky approval, then served
0.25 where its lessons had served 0.58). Pinned lessons are served in both arms.

It never blocks or fails a request: an index not loaded yet (the store was away), a
retrieval that raised or cost more than ``budget_ms`` of CPU, a request with nothing to
match on: the request goes out without lessons, and `/health` counts why.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from nextstate.core.hints import Placement, joined, place_hint, prompt_with_hint
from nextstate.core.records import Endpoint
from nextstate.core.retrieval import Doc, LessonIndex
from nextstate.core.sessions import text_of
from nextstate.core.store import Store
from nextstate.core.store.handover import LESSONS, WEIGHTS, memory_version
from nextstate.core.store.lessons import scope_of
from nextstate.proxy.settings import MemorySettings

log = logging.getLogger("nextstate.proxy.memory")
QUERY_CHARS = 2000  # the end of the last user message is what a request is matched on


@dataclass
class MemoryCounts:
    """What the memory did, for ``GET /health``."""

    served: int = 0  # requests that got lessons
    lessons_served: int = 0
    chars_served: int = 0
    unmatched: int = 0  # no lesson fit the request
    withheld: int = 0  # lessons fit, served without them (the control share, or handed over)
    control: int = 0  # recorded requests served the other way than their asker's mode
    slow: int = 0  # retrieval over the budget: served without lessons
    failed: int = 0  # retrieval raised: served without lessons
    not_ready: int = 0  # the index was not loaded yet (the store was away)
    refreshes: int = 0  # index rebuilds
    refresh_errors: int = 0


def fit(docs: Sequence[Doc], max_chars: int) -> list[Doc]:
    """The lessons, best first, that fit in ``max_chars`` together (a line each)."""
    out: list[Doc] = []
    used = 0
    for doc in docs:
        cost = len(doc.text) + (1 if out else 0)
        if used + cost <= max_chars:
            out.append(doc)
            used += cost
    return out


def query_of(body: dict[str, Any], endpoint: Endpoint) -> str:
    """The text a request is matched on: its last user message (a completions prompt's
    end)."""
    if endpoint == "completions":
        prompt = body.get("prompt")
        return prompt[-QUERY_CHARS:] if isinstance(prompt, str) else ""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return text_of(message.get("content"))[-QUERY_CHARS:]
    return ""


class Memory:
    """The lessons index the request path reads, kept in step with the store off it."""

    def __init__(self, settings: MemorySettings, store: Store,
                 policy: str | None = None) -> None:
        self.settings = settings
        self.store = store
        self.policy = policy  # with a policy, only requests for it get lessons
        self.rng = random.Random()  # draws the control share
        self.index: LessonIndex | None = None
        self.modes: dict[tuple[str | None, str | None], str] = {}  # decided askers: mode
        self.counts = MemoryCounts()
        self.refreshed_at: float | None = None
        # One refresh at a time: a slow build that started first must not replace the
        # index a later one made (the follower's first build and a forced refresh race).
        self._refreshing = asyncio.Lock()

    def serve(self, body: dict[str, Any], endpoint: Endpoint, model: object,
              tenant: str | None, user: str | None, recorded: bool = True,
              adapter: bool = True) -> dict[str, Any] | None:
        """Add the lessons that fit this request to ``body`` (a new messages list or
        prompt; nothing the record shares is changed); returns the record's ``lessons``
        (ids, the hint text and where it went; the arm and the ids held back, where
        unpinned lessons fit and ``adapter`` serves the request), or None when none fit."""
        settings = self.settings
        if not settings.serves(tenant, user) or (
                self.policy is not None and model != self.policy):
            return None
        index = self.index
        if index is None:
            self.counts.not_ready += 1
            return None
        # The budget caps what retrieval itself costs, so it counts this thread's CPU
        # time: a request preempted by other work (vLLM on the same cores, a loaded
        # machine) would otherwise lose its lessons at random, and dropping them then
        # would give back no time anyway: the search is done.
        started = time.thread_time()
        try:
            query = query_of(body, endpoint)
            docs = fit(index.search(query, tenant, user, k=settings.lessons),
                       settings.max_chars) if query else []
        except Exception:  # never the request's problem
            self.counts.failed += 1
            log.exception("lesson retrieval failed")
            return None
        if (time.thread_time() - started) * 1000 > settings.budget_ms:
            self.counts.slow += 1
            return None
        if not docs:  # (a prompt that is not text has no query: nothing fits it)
            self.counts.unmatched += 1
            return None
        arm = self._arm(docs, tenant, user, recorded) if adapter else None
        choice: dict[str, Any] = {} if arm is None else {"arm": arm}
        if arm == WEIGHTS:
            choice["withheld"] = [doc.id for doc in docs if not doc.pinned]
            docs = [doc for doc in docs if doc.pinned]
            self.counts.withheld += 1
        hint = joined(doc.text for doc in docs)
        placement = self._place(body, endpoint, hint) if hint is not None else None
        if hint is None or placement is None:
            # Held back, with no pinned lesson to serve: the record still says so.
            return {"ids": [], **choice} if choice else None
        self.counts.served += 1
        self.counts.lessons_served += len(docs)
        self.counts.chars_served += len(hint)
        return {"ids": [doc.id for doc in docs], "hint": hint, **placement.as_dict(),
                **choice}

    def _arm(self, docs: Sequence[Doc], tenant: str | None, user: str | None,
             recorded: bool) -> str | None:
        """LESSONS or WEIGHTS: whether this request gets its unpinned lessons (None: it
        has none, so there is nothing to choose)."""
        if all(doc.pinned for doc in docs):
            return None
        mode = self.modes.get(scope_of(tenant, user), LESSONS)
        if recorded and self.rng.random() < self.settings.control:
            self.counts.control += 1
            return WEIGHTS if mode == LESSONS else LESSONS
        return mode

    @staticmethod
    def _place(body: dict[str, Any], endpoint: Endpoint, hint: str) -> Placement | None:
        if endpoint == "completions":
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                return None  # token ids, or a batch of prompts: left as they are
            body["prompt"] = prompt_with_hint(prompt, hint)
            return Placement(-1, None, len(prompt))
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        body["messages"], placement = place_hint(messages, hint)
        return placement

    # -- off the request path ---------------------------------------------------------------

    async def refresh(self, force: bool = False) -> None:
        """Rebuild the index if the store's lessons changed (on a thread)."""
        async with self._refreshing:
            version = await asyncio.to_thread(memory_version, self.store.lessons,
                                              self.store.handover)
            if not force and self.index is not None and self.index.version == version:
                self.refreshed_at = time.time()
                return
            self.index, self.modes = await asyncio.to_thread(self._build, version)
            self.counts.refreshes += 1
            self.refreshed_at = time.time()

    def _build(self, version: object) -> tuple[LessonIndex, dict[Any, str]]:
        rows = self.store.lessons.servable()
        modes = self.store.handover.modes()
        index = LessonIndex([Doc(id=r["id"], scope=(r["tenant"], r["user"]), text=r["text"],
                                 pinned=bool(r["pinned"]), support=int(r["support"] or 1),
                                 context=r["context"] or "") for r in rows], version,
                            per_scope=self.settings.scope_lessons)
        return index, modes

    async def follow(self) -> None:
        """Keep in step with the store for the app's lifetime."""
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # the store is away: keep serving what we have
                self.counts.refresh_errors += 1
                log.debug("could not read the lessons: %s", exc)
            await asyncio.sleep(self.settings.refresh_seconds)

    def snapshot(self) -> dict[str, Any]:
        index = self.index
        return {"lessons": index.size if index is not None else None,
                "handed_over": sum(mode == WEIGHTS for mode in self.modes.values()),
                # The store's lessons and modes as last read (`memory_version`): a client
                # can tell when this proxy serves what the learner just wrote.
                "version": index.version if index is not None else None,
                "refreshed_at": self.refreshed_at, **asdict(self.counts)}
