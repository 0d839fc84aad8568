"""The adapter registry: every LoRA version the learner made, and which one serves
(learner -> store -> proxy; nextstate adapters / the proxy's admin endpoints -> store).

The learner stages a version (its row, status ``staged``), loads it into every vLLM,
then publishes it: one transaction makes it current, retires the one before it
(``previous``) and marks the turns it learned from trained, so that a learner killed at
any moment neither trains a turn twice nor serves a version vLLM does not have. The
proxy follows the current versions (`currents`); a rollback makes an earlier one current
again once every vLLM has it (`nextstate.core.lora.rollback`). The statuses and their
meaning: `nextstate.core.lora.AdapterStatus`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, update

from nextstate.core.lora import NOT_SERVABLE, AdapterStatus
from nextstate.core.store.database import Database
from nextstate.core.store.schema import adapters, judgments


class TurnsForgotten(Exception):
    """Turns a step learned from were forgotten before its adapter was published: the
    adapter is discarded, and the trainer's weights with it."""


class AdapterRegistry:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- reading ------------------------------------------------------------------------

    def versions(self, policy: str | None = None) -> list[dict[str, Any]]:
        """Every version (of ``policy``), oldest first."""
        query = select(adapters).order_by(adapters.c.version)
        if policy is not None:
            query = query.where(adapters.c.policy == policy)
        with self.db.connect() as conn:
            return [{str(k): v for k, v in row._mapping.items()} for row in conn.execute(query)]

    def current(self, policy: str) -> dict[str, Any] | None:
        """The row of the version serving ``policy``, if any."""
        return next((a for a in self.versions(policy)
                     if a["status"] == AdapterStatus.CURRENT), None)

    def currents(self, policy: str) -> dict[str, tuple[str, str]]:
        """The current version of ``policy`` and of each of its personal policies
        (``<policy>~<user>``), in one query: {policy: (name, directory)}."""
        personal = adapters.c.policy.startswith(f"{policy}~", autoescape=True)
        with self.db.connect() as conn:
            rows = conn.execute(select(adapters.c.policy, adapters.c.name, adapters.c.path)
                                .where(adapters.c.status == AdapterStatus.CURRENT,
                                       (adapters.c.policy == policy) | personal))
            return {row.policy: (row.name, row.path) for row in rows}

    def next_version(self) -> int:
        with self.db.connect() as conn:
            return int(conn.execute(select(func.max(adapters.c.version))).scalar() or 0) + 1

    # -- the learner's steps ------------------------------------------------------------

    def stage(self, version: int, name: str, policy: str, path: str,
              stats: dict[str, Any]) -> None:
        with self.db.begin() as conn:
            conn.execute(adapters.insert().values(
                version=version, name=name, policy=policy, path=path,
                status=AdapterStatus.STAGED, created_at=time.time(), stats=stats))

    def publish(self, version: int, turn_ids: Sequence[str], policy: str) -> None:
        """Make ``version`` current for ``policy`` and mark the turns it learned from,
        atomically. Raises `TurnsForgotten`, and marks the version forgotten instead, if
        any of those turns were forgotten while the step trained on them (or the version
        was, with its user): an adapter never serves what was forgotten."""
        now = time.time()
        try:
            with self.db.begin() as conn:
                # The turns first, then the adapters: the order `Retention.forget` takes
                # them in, so that the two wait for each other rather than deadlock.
                kept = conn.execute(update(judgments)
                                    .where(judgments.c.turn_id.in_(list(turn_ids)))
                                    .values(trained_version=version)).rowcount
                if kept < len(set(turn_ids)):
                    raise TurnsForgotten(f"{len(set(turn_ids)) - kept} of the turns version "
                                         f"{version} learned from were forgotten")
                conn.execute(update(adapters).where(adapters.c.status == AdapterStatus.CURRENT,
                                                    adapters.c.policy == policy)
                             .values(status=AdapterStatus.PREVIOUS, retired_at=now))
                made = conn.execute(
                    update(adapters)
                    .where(adapters.c.version == version,
                           adapters.c.status == AdapterStatus.STAGED)
                    .values(status=AdapterStatus.CURRENT, published_at=now, error=None))
                if not made.rowcount:
                    raise TurnsForgotten(f"version {version} was forgotten before it served")
        except TurnsForgotten as exc:
            self.set_status(version, AdapterStatus.FORGOTTEN, str(exc))
            raise

    def set_status(self, version: int, status: AdapterStatus, error: str | None = None,
                   ) -> None:
        with self.db.begin() as conn:
            conn.execute(update(adapters).where(adapters.c.version == version)
                         .values(status=status, error=error))

    def abandon_staged(self) -> int:
        """Versions a killed learner staged but never published."""
        with self.db.begin() as conn:
            return int(conn.execute(
                update(adapters).where(adapters.c.status == AdapterStatus.STAGED)
                .values(status=AdapterStatus.ABANDONED)).rowcount or 0)

    # -- administration -----------------------------------------------------------------

    def rollback(self, version: int) -> dict[str, Any]:
        """Make an earlier version of its policy current again (loading it into vLLM is
        the caller's job, first: `nextstate.core.lora.rollback`). Returns its row."""
        now = time.time()
        with self.db.begin() as conn:
            row = conn.execute(select(adapters).where(adapters.c.version == version)).first()
            if row is None or row.status in NOT_SERVABLE:
                raise LookupError(f"no published version {version}")
            conn.execute(update(adapters).where(adapters.c.status == AdapterStatus.CURRENT,
                                                adapters.c.policy == row.policy)
                         .values(status=AdapterStatus.PREVIOUS, retired_at=now))
            conn.execute(update(adapters).where(adapters.c.version == version)
                         .values(status=AdapterStatus.CURRENT, published_at=now))
        return {str(k): v for k, v in row._mapping.items()}
