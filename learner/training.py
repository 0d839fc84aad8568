"""The training stage: judged turns -> a LoRA step -> a new adapter serving in vLLM
(store -> learner -> trainer -> publish -> vLLM).

A step runs once ``batch_turns`` judged turns carry a signal for the chosen method. The
new adapter goes through the publish gate (how far the step moved the policy on its own
batch, as KL), is written to a new immutable directory, loaded into vLLM under a new
name, and only then made current in the store, in the same transaction that marks its
turns trained. If anything fails before that, the trainer is put back as it was and the
turns stay untrained: nothing is trained twice, nothing is lost. A step refused by the
gate (over the bound at every rate tried) marks its turns skipped, with the reason.

Each step records what the hints did (`items.weak_hints`); judged turns become the
trainer's input in items.py.

With personal adapters (`personal`), each user past ``personal_min_turns`` is a lane of
its own; a step trains the lane with the most turns waiting. One trainer serves every
lane: before a step it loads that lane's current adapter (weights and optimizer state)
from its directory, so memory stays one base model and one adapter however many users.

A turn with images (a GUI agent's screenshots) trains with them (`items.images_of`,
and the trainer feeds them to a vision-language base model); one whose images the
trainer cannot have is skipped, with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from nextstate.core.lora import (
    PUBLISHED,
    AdapterStatus,
    NotLoaded,
    load_verified,
    owns,
    version_name,
    version_of,
)
from nextstate.core.store import Store
from nextstate.core.vllm import VLLMClient
from nextstate.learner.config import TrainingConfig
from nextstate.learner.items import (
    TrainItem,
    Unreadable,
    images_of,
    informative,
    normalise_steps,
    to_item,
    weak_hints,
)
from nextstate.learner.multimodal import image_token_id
from nextstate.learner.personal import Lane, full_lanes
from nextstate.learner.publish import install, prune
from nextstate.learner.ranks import Leader, make_trainer
from nextstate.learner.trainer import StepStats, Trainer

log = logging.getLogger("nextstate.learner.training")


@dataclass
class StepResult:
    version: int | None
    name: str | None
    stats: StepStats
    # Refused by the publish gate, or not loaded: otherwise published or skipped. Plain
    # strings: the status keys its counts by outcome, and JSON keys must be str.
    outcome: Literal["published", "skipped", "refused", "failed"]
    error: str | None = None


class TrainingStage:
    def __init__(self, store: Store, model_dir: Path, policy: str,
                 vllms: list[VLLMClient], adapters_dir: Path,
                 config: TrainingConfig = TrainingConfig()) -> None:
        self.store = store
        self.model_dir = model_dir
        self.policy = policy
        self.vllms = vllms  # one per vLLM backend: every adapter goes to all of them
        self.adapters_dir = adapters_dir
        self.config = config
        # Its marks: "fresh" (a new adapter), "before" (the weights as a step starts).
        self.trainer: Trainer | Leader | None = None
        # Whose weights the trainer holds: (policy, version; 0 for none yet).
        self.loaded: tuple[str, int] | None = None
        self.started = False  # versions a killed learner staged are marked abandoned
        self.history: list[dict[str, Any]] = []  # recent steps, for the status endpoint
        self.image_token = image_token_id(model_dir)  # None: a text-only model

    def _trainer(self, lane: Lane) -> Trainer | Leader:
        """The trainer, holding ``lane``'s current adapter and its optimizer state (read
        from its directory when another lane, or an earlier version after a rollback,
        was there). A user's first adapter starts from the shared adapter's weights;
        a policy's very first from a fresh LoRA."""
        current = self.store.adapters.current(lane.policy)
        key = (lane.policy, current["version"] if current else 0)
        if self.trainer is not None and key == self.loaded:
            return self.trainer
        if self.trainer is None:
            self.trainer = make_trainer(self.model_dir, self.config.trainer)
            self.trainer.mark("fresh")
        source = current
        if source is None and lane.user is not None:
            source = self.store.adapters.current(self.policy)
        if source is not None:
            self.trainer.load(Path(source["path"]))
        else:
            self.trainer.rewind("fresh")
        self.loaded = key
        return self.trainer

    def ready(self, lane: Lane | None = None) -> list[TrainItem]:
        """``lane``'s turns ready to train on (default: the shared lane), after dropping
        (or down-weighting) stale ones."""
        cfg = self.config
        lane = lane or Lane(self.policy)
        rows = self.store.judgments.ready_for_training(
            cfg.trainer.method, 4 * cfg.trainer.batch_turns, user=lane.user,
            personal_after=cfg.personal_min_turns if lane.user is None else None)
        # How far behind a turn is: this policy's versions published after the one that
        # served it (version numbers are global and may skip, see `_fresh_name`).
        published = sorted(a["version"] for a in self.store.adapters.versions(lane.policy)
                           if a["status"] in PUBLISHED)
        items, stale, unreadable = [], [], {}
        for row in rows:
            served = version_of(row["served_model"])
            behind = sum(1 for v in published if v > served)
            if behind > cfg.max_staleness and cfg.stale != "downweight":
                stale.append(row["id"])
                continue
            weight = 1.0 if behind <= cfg.max_staleness else \
                1.0 / (1 + behind - cfg.max_staleness)
            try:
                items.append(to_item(row, weight, images_of(self.store, row, self.image_token)))
            except Unreadable as exc:
                unreadable.setdefault(f"images: {exc}", []).append(row["id"])
        if stale:
            self.store.judgments.skip(
                stale, f"stale: served more than {cfg.max_staleness} versions ago")
        for reason, ids in unreadable.items():
            self.store.judgments.skip(ids, reason)
        return items

    async def maybe_step(self) -> StepResult | None:
        """One step for the lane with the most turns waiting, once it has a batch."""
        cfg = self.config
        batch_turns = cfg.trainer.batch_turns
        lanes = await asyncio.to_thread(full_lanes, self.store.judgments, self.policy,
                                        cfg.trainer.method, batch_turns,
                                        cfg.personal_min_turns)
        for lane in lanes:
            items = await asyncio.to_thread(self.ready, lane)
            if len(items) >= batch_turns:  # still, once stale turns were dropped
                return await self.step(items[:batch_turns], lane)
        return None

    async def step(self, items: list[TrainItem], lane: Lane | None = None) -> StepResult:
        lane = lane or Lane(self.policy)
        normalise_steps(items)
        distils = self.config.trainer.method != "binary"
        hints = weak_hints(items, self.config.min_teacher_change if distils else 0.0)
        ids = [item.turn_id for item in items]
        # A step consumes its judged turns; those without the method's signal (a thank-you
        # under distillation) are part of it but teach nothing, so they stay out of the
        # loss instead of diluting it.
        useful = informative(items, self.config.trainer)
        if not useful:
            reason = f"no {self.config.trainer.method} signal in these {len(items)} turns"
            await asyncio.to_thread(self.store.judgments.skip, ids, reason)
            return self._remember(StepResult(None, None, StepStats(turns=len(items)),
                                             "skipped", reason), lane)
        trainer = await asyncio.to_thread(self._trainer, lane)
        await asyncio.to_thread(trainer.mark, "before")
        log.info("training %s on %d turns", lane.policy, len(useful))
        stats, moved = await self._gated_step(trainer, useful)
        if stats is None:
            cfg = self.config
            tries = ", ".join(f"{kl:.3f} at {scale:g}x" for scale, kl in moved)
            reason = (f"publish gate: the step moved the policy {tries} the learning rate "
                      f"(nats/token), over the bound {cfg.gate_max_kl}")
            await asyncio.to_thread(self.store.judgments.skip, ids, reason)
            log.error(reason)
            last = StepStats(turns=len(useful), kl=moved[-1][1],
                             extra={"lr_scale": moved[-1][0], **hints})
            return self._remember(StepResult(None, None, last, "refused", reason), lane)
        stats.extra.update(hints)
        log.info("trained %s in %.1f s (kl %.4f)", lane.policy, stats.seconds, stats.kl)
        version, name = await self._fresh_name(lane.policy)
        staged = self.adapters_dir / f".staging-{name}"
        await asyncio.to_thread(trainer.save, staged, stats)
        path = await asyncio.to_thread(install, staged, self.adapters_dir, name)
        await asyncio.to_thread(self.store.adapters.stage, version, name, lane.policy,
                                str(path), asdict(stats))
        log.info("publishing %s", name)
        try:
            for vllm in self.vllms:  # verified on each; current only once all have it
                await load_verified(vllm, name, path)
        except NotLoaded as exc:
            # The turns stay untrained: learn from them again.
            await asyncio.to_thread(trainer.rewind, "before")
            await asyncio.to_thread(self.store.adapters.set_status, version,
                                    AdapterStatus.FAILED, str(exc))
            log.error("adapter %s not published: %s", name, exc)
            return self._remember(
                StepResult(version, name, stats, "failed", str(exc)), lane)
        await asyncio.to_thread(self.store.adapters.publish, version, ids, lane.policy)
        self.loaded = (lane.policy, version)
        log.info("published %s (%d turns, loss %.4f, kl %.4f)", name, len(items), stats.loss,
                 stats.kl)
        return self._remember(StepResult(version, name, stats, "published"), lane)

    async def _gated_step(self, trainer: Trainer | Leader, items: list[TrainItem]
                          ) -> tuple[StepStats | None, list[tuple[float, float]]]:
        """The step, within the publish gate: one over the bound is undone and taken again
        from the same start at half the learning rate, ``gate_retries`` times at most.
        Returns its stats (None: every try was over) and each try's (scale, KL)."""
        cfg = self.config
        moved: list[tuple[float, float]] = []
        for attempt in range(cfg.gate_retries + 1 if cfg.gate else 1):
            scale = 0.5 ** attempt
            stats = await asyncio.to_thread(trainer.step, items, scale)
            moved.append((scale, stats.kl))
            if not cfg.gate or stats.kl <= cfg.gate_max_kl:
                stats.extra["kl_first_try"] = moved[0][1]
                if attempt:
                    log.warning("step taken at %gx the learning rate (KL %s)", scale,
                                ", ".join(f"{kl:.3f}" for _, kl in moved))
                return stats, moved
            await asyncio.to_thread(trainer.rewind, "before")
        return None, moved

    async def _fresh_name(self, policy: str) -> tuple[int, str]:
        """The next version, skipping names a backend already has loaded: a store that
        was reset while vLLM kept running would otherwise reuse a name for different
        weights, which vLLM would keep serving from its cache."""
        version = await asyncio.to_thread(self.store.adapters.next_version)
        taken: set[str] = set()
        for vllm in self.vllms:
            # An unreachable backend gets the adapter when it is back.
            with contextlib.suppress(Exception):
                taken |= await vllm.models()
        while version_name(policy, version) in taken:
            version += 1
        return version, version_name(policy, version)

    def _remember(self, result: StepResult, lane: Lane) -> StepResult:
        self.history = [*self.history, {
            "version": result.version, "name": result.name, "policy": lane.policy,
            "outcome": result.outcome, "error": result.error, "at": time.time(),
            "user": lane.user, **asdict(result.stats)}][-10:]
        return result

    async def housekeeping(self) -> None:
        """On every backend: reload current adapters (the shared one and every personal
        one) if vLLM lost them (a restart), unload versions past their grace period and
        versions that never became current (a learner killed while publishing one, after
        vLLM had loaded it); then delete old directories."""
        if not self.started:  # what a killed learner was publishing will never serve
            abandoned = await asyncio.to_thread(self.store.adapters.abandon_staged)
            if abandoned:
                log.warning("%d version(s) a stopped learner was publishing: abandoned",
                            abandoned)
            self.started = True
        versions = await asyncio.to_thread(self.store.adapters.versions)
        rows = [r for r in versions if owns(self.policy, r["policy"])]
        for vllm in self.vllms:
            try:
                loaded = await vllm.models()
            except Exception as exc:  # that backend is down: the proxy routes around it
                log.warning("backend %s unreachable: %s", vllm.url, exc)
                continue
            for row in rows:
                if row["status"] == AdapterStatus.CURRENT and row["name"] not in loaded:
                    log.warning("%s lost %s (restarted?): loading it again", vllm.url,
                                row["name"])
                    await load_verified(vllm, row["name"], Path(row["path"]))
                retired = row["retired_at"] or 0
                if row["status"] == AdapterStatus.PREVIOUS and \
                        time.time() - retired > self.config.unload_grace:
                    await vllm.unload_adapter(row["name"])
                if row["status"] in (AdapterStatus.ABANDONED, AdapterStatus.FAILED) \
                        and row["name"] in loaded:
                    log.warning("unloading %s from %s: it never served", row["name"],
                                vllm.url)
                    await vllm.unload_adapter(row["name"])
        await asyncio.to_thread(self._retire_and_prune, rows)

    def _retire_and_prune(self, rows: list[dict[str, Any]]) -> None:
        """Versions past their grace period are unloaded (in the store), then old
        directories deleted (in a thread: SQL and rmtree)."""
        for row in rows:
            retired = row["retired_at"] or 0
            if row["status"] == AdapterStatus.PREVIOUS \
                    and time.time() - retired > self.config.unload_grace:
                self.store.adapters.set_status(row["version"], AdapterStatus.UNLOADED)
        by_policy: dict[str, list[dict[str, Any]]] = {}
        for row in self.store.adapters.versions():
            if owns(self.policy, row["policy"]):
                by_policy.setdefault(row["policy"], []).append(row)
        for mine in by_policy.values():
            prune(self.adapters_dir, mine, self.config.keep)

    async def backends(self) -> dict[str, list[str]]:
        """The adapter versions of this policy (and its personal policies) each backend
        has loaded (for status)."""
        out: dict[str, list[str]] = {}
        for vllm in self.vllms:
            try:
                names = await vllm.models()
            except Exception:
                out[vllm.url] = ["unreachable"]
                continue
            out[vllm.url] = sorted(n for n in names if n.startswith(
                (f"{self.policy}@", f"{self.policy}~")))
        return out
