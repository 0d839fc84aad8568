"""Retention: turns deleted on request or past their age, with everything derived from
them, and sessions ended when idle (nextstate forget, DELETE /v1/sessions|tenants, the
recorder's sweep -> store).

A turn forgotten takes its conversation keys, feedback and judgment with it, and a
session left empty goes too; so does a lesson of the memory learned only from forgotten
turns (one a person wrote stays until its scope is forgotten). A user or a tenant
forgotten as a whole also loses the personal adapters trained on their turns: their
versions are marked ``forgotten`` in the same transaction (their directories and vLLM's
copies are erased by `nextstate.core.lora.erase`), and every lesson of their scope,
written by hand or not. An image (images.py) goes with the last turn that referenced it.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, or_, select, update

from nextstate.core.lora import PERSONAL, AdapterStatus, personal_key
from nextstate.core.store.database import Database
from nextstate.core.store.handover import forget_modes
from nextstate.core.store.images import Images
from nextstate.core.store.schema import (
    adapters,
    feedback,
    judgments,
    lesson_turns,
    lessons,
    sessions,
    turn_images,
    turn_keys,
    turns,
)


@dataclass(frozen=True)
class Forgotten:
    """What `Retention.forget` deleted."""

    turns: int
    lessons: int
    # The personal adapter versions of users forgotten as a whole, now marked
    # ``forgotten``: unloading them from vLLM and deleting their directories is the
    # caller's (or the learner's) job.
    adapters: list[dict[str, Any]]
    images: int = 0  # images no remaining turn referenced, deleted


class Retention:
    def __init__(self, db: Database) -> None:
        self.db = db

    def forget(self, *, session_id: str | None = None, tenant: str | None = None,
               user: str | None = None, older_than: float | None = None) -> Forgotten:
        """Delete turns (of a session, a tenant, a user, or created before ``older_than``)
        with everything derived from them: conversation keys, feedback, judgments, and
        sessions left empty. A user or a tenant forgotten as a whole (no session, no age)
        also loses the personal adapters trained on their turns: their versions are
        marked ``forgotten`` in the same transaction, so the proxy stops routing to them
        and the learner never loads them again nor starts a step from them."""
        where = []
        if session_id is not None:
            where.append(turns.c.session_id == session_id)
        if tenant is not None:
            where.append(turns.c.tenant == tenant)
        if user is not None:
            where.append(turns.c.user == user)
        if older_than is not None:
            where.append(turns.c.created_at < older_than)
        if not where:
            raise ValueError("forget what? give a session, a tenant, a user or an age")
        whole = session_id is None and older_than is None
        with self.db.begin() as conn:
            # Who the doomed turns belonged to, before they go: a user id that cannot name
            # a directory is hashed in its adapter's name, so only the id finds it.
            people: set[str] = set()
            if whole:
                people = {row.user for row in conn.execute(
                    select(turns.c.user).where(*where, turns.c.user.is_not(None)).distinct())}
                people.add(user if user is not None else str(tenant))
            doomed = select(turns.c.id).where(*where).scalar_subquery()
            for table, column in ((turn_keys, turn_keys.c.turn_id),
                                  (feedback, feedback.c.turn_id),
                                  (judgments, judgments.c.turn_id),
                                  (lesson_turns, lesson_turns.c.turn_id)):
                conn.execute(table.delete().where(column.in_(doomed)))
            unlinked = conn.execute(turn_images.delete().where(
                turn_images.c.turn_id.in_(doomed))).rowcount
            deleted = conn.execute(turns.delete().where(*where)).rowcount
            # (Only after unlinking: the age sweep runs often and mostly finds nothing.)
            images_gone = Images.collect_garbage(conn) if unlinked else 0
            if session_id is not None:
                conn.execute(feedback.delete().where(feedback.c.session_id == session_id))
            if tenant is not None and whole and user is None:
                conn.execute(feedback.delete().where(feedback.c.tenant == tenant))
            conn.execute(sessions.delete().where(~sessions.c.id.in_(
                select(turns.c.session_id).distinct())))
            # After the turns: a learner step that read them fails to publish (see
            # AdapterRegistry.publish), and one that published already is marked here.
            marked = (self._forget_adapters(conn, people, tenant if user is None else None)
                      if whole else [])
            gone = self._forget_lessons(conn, tenant if whole else None,
                                        user if whole else None)
        return Forgotten(int(deleted or 0), gone, marked, images_gone)

    @staticmethod
    def _forget_lessons(conn: Connection, tenant: str | None, user: str | None) -> int:
        """Lessons of a scope forgotten whole (a tenant: its users' too), then every
        learned lesson whose source turns are all gone."""
        gone = 0
        scope = []
        if user is not None:
            scope.append(lessons.c.user == user)
        elif tenant is not None:
            scope.append(lessons.c.tenant == tenant)
        if scope:
            forget_modes(conn, tenant, user)
            doomed = select(lessons.c.id).where(or_(*scope)).scalar_subquery()
            conn.execute(lesson_turns.delete().where(lesson_turns.c.lesson_id.in_(doomed)))
            gone += conn.execute(lessons.delete().where(or_(*scope))).rowcount or 0
        orphans = select(lessons.c.id).where(
            lessons.c.origin != "manual", ~lessons.c.id.in_(
                select(lesson_turns.c.lesson_id).where(lesson_turns.c.role == "source")))
        ids = list(conn.execute(orphans).scalars())
        if ids:
            conn.execute(lesson_turns.delete().where(lesson_turns.c.lesson_id.in_(ids)))
            gone += conn.execute(lessons.delete().where(lessons.c.id.in_(ids))).rowcount or 0
        return int(gone)

    def _forget_adapters(self, conn: Connection, people: Collection[str],
                         tenant: str | None) -> list[dict[str, Any]]:
        """Mark the personal adapters of ``people``, and of every user of ``tenant``
        (``tenant:id``), forgotten. The rows stay (names only, their directories go):
        version numbers and names are never reused, and a vLLM that was out of reach can
        still be told to unload them."""
        rows = conn.execute(select(adapters).where(
            adapters.c.policy.contains(PERSONAL, autoescape=True),
            adapters.c.status != AdapterStatus.FORGOTTEN)).all()
        keys = {personal_key(who) for who in people}

        def theirs(policy: str) -> bool:
            key = policy.rpartition(PERSONAL)[2]  # a user's part never holds "~"
            return key in keys or (tenant is not None and key.startswith(f"{tenant}:"))

        marked = [{str(k): v for k, v in row._mapping.items()}
                  for row in rows if theirs(row.policy)]
        if marked:
            conn.execute(update(adapters).where(adapters.c.version.in_(
                [row["version"] for row in marked])).values(status=AdapterStatus.FORGOTTEN))
        return [{**row, "status": AdapterStatus.FORGOTTEN} for row in marked]


    def expire_idle(self, idle_seconds: float, now: float | None = None) -> int:
        """End sessions idle for longer than ``idle_seconds``: their last turn gets no
        next state. Returns how many turns were closed."""
        cutoff = (now if now is not None else time.time()) - idle_seconds
        with self.db.begin() as conn:
            closed = conn.execute(
                update(turns)
                .where(turns.c.next_state_status == "pending", turns.c.created_at < cutoff)
                .values(next_state_status="none")
            ).rowcount
            conn.execute(update(sessions)
                         .where(sessions.c.done.is_(False), sessions.c.updated_at < cutoff)
                         .values(done=True))
        return int(closed or 0)
