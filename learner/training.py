"""The training stage: judged turns -> a LoRA step -> a new adapter serving in vLLM
(store -> learner -> trainer -> publish -> vLLM).

A step runs once ``batch_turns`` judged turns carry a signal for the chosen method. The
new adapter goes through the publish gate (how far the step moved the policy on its own
batch, as KL), is written to a new immutable directory, loaded into vLLM under a new
name, and only then made current in the store, in the same transaction that marks its
turns trained. If anything fails before that, the trainer is put back as it was and the
turns stay untrained: nothing is trained twice, nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from nextstate.learner.publish import (
    PublishError,
    VLLMAdmin,
    install,
    prune,
    version_name,
    version_of,
)
from nextstate.learner.store import LearnerStore
from nextstate.learner.trainer import StepStats, Trainer, TrainerConfig, TrainItem

log = logging.getLogger("nextstate.learner.training")


@dataclass(frozen=True)
class TrainingConfig:
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # A turn served by an adapter more than this many versions older than the current
    # one is dropped ("drop") or weighted 1/(1 + extra versions) ("downweight").
    max_staleness: int = 4
    stale: Literal["drop", "downweight"] = "drop"
    gate: bool = True
    gate_max_kl: float = 1.0  # nats per token on the step's own batch
    keep: int = 5  # adapter directories kept on disk (loaded ones are never deleted)
    unload_grace: float = 120.0  # seconds an old version stays loaded for in-flight requests


@dataclass
class StepResult:
    version: int | None
    name: str | None
    stats: StepStats
    outcome: Literal["published", "refused", "failed"]
    error: str | None = None


def to_item(row: dict[str, Any], weight: float = 1.0) -> TrainItem:
    """A store row as the trainer's input.

    Reward: the judge's score (+1/-1); for a step of an episode with an outcome (feedback
    for the whole session, a test verdict), the outcome plus the step's mean judge vote.
    Several hints: their teacher logprobs are averaged token by token (a smoother target
    than any single hint's)."""
    teachers = [t for t in row.get("teacher_logprobs") or [] if t]
    teacher = [sum(col) / len(col) for col in zip(*teachers, strict=True)] if teachers else None
    score = row.get("score")
    reward = float(score) if score in (1, -1) else None
    if row.get("outcome") is not None:
        votes = [v for v in row.get("votes") or [] if v is not None]
        reward = float(row["outcome"]) + (sum(votes) / len(votes) if votes else 0.0)
    return TrainItem(turn_id=row["id"], prompt_ids=list(row["prompt_token_ids"]),
                     completion_ids=list(row["completion_token_ids"]),
                     sampler_logprobs=[float(x) for x in row["logprobs"]], reward=reward,
                     teacher_logprobs=teacher, weight=weight,
                     group=row["session_id"] if row.get("outcome") is not None else None)


def normalise_steps(items: list[TrainItem]) -> None:
    """Rewards of the steps of one episode, made relative to each other (mean 0, std 1)
    where the batch holds several steps of it: which step helped the outcome most."""
    groups: dict[str, list[TrainItem]] = {}
    for item in items:
        if item.group is not None and item.reward is not None:
            groups.setdefault(item.group, []).append(item)
    for steps in groups.values():
        if len(steps) < 2:
            continue
        rewards = [s.reward for s in steps if s.reward is not None]
        mean = sum(rewards) / len(rewards)
        std = (sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5
        for step in steps:
            assert step.reward is not None
            step.reward = (step.reward - mean) / (std + 1e-6) if std > 1e-6 else 0.0


class TrainingStage:
    def __init__(self, store: LearnerStore, model_dir: Path, policy: str,
                 admins: list[VLLMAdmin], adapters_dir: Path,
                 config: TrainingConfig = TrainingConfig()) -> None:
        self.store = store
        self.model_dir = model_dir
        self.policy = policy
        self.admins = admins  # one per vLLM backend: every adapter goes to all of them
        self.adapters_dir = adapters_dir
        self.config = config
        self.trainer: Trainer | None = None
        self.trained_from = 0  # the version the trainer's weights are (0: the base)
        self.history: list[dict[str, Any]] = []  # recent steps, for the status endpoint

    def _trainer(self) -> Trainer:
        """Built from the current adapter and its optimizer state: on first use, and again
        when someone rolled the current version back."""
        current = self.store.current_adapter(self.policy)
        version = current["version"] if current else 0
        if self.trainer is None or version != self.trained_from:
            self.store.abandon_staged()
            resume = Path(current["path"]) if current else None
            self.trainer = Trainer(self.model_dir, self.config.trainer, resume_from=resume)
            self.trained_from = version
        return self.trainer

    def ready(self) -> list[TrainItem]:
        """Turns ready to train on, after dropping (or down-weighting) stale ones."""
        cfg = self.config
        rows = self.store.ready_for_training(cfg.trainer.method, 4 * cfg.trainer.batch_turns)
        # How far behind a turn is: this policy's versions published after the one that
        # served it (version numbers themselves may skip, see `_fresh_name`).
        published = sorted(a["version"] for a in self.store.adapters(self.policy)
                           if a["status"] in ("current", "previous", "unloaded"))
        items, stale = [], []
        for row in rows:
            served = version_of(row["served_model"])
            behind = sum(1 for v in published if v > served)
            if behind <= cfg.max_staleness:
                items.append(to_item(row))
            elif cfg.stale == "downweight":
                items.append(to_item(row, weight=1.0 / (1 + behind - cfg.max_staleness)))
            else:
                stale.append(row["id"])
        if stale:
            self.store.skip(stale, f"stale: served more than {cfg.max_staleness} versions ago")
        return items

    async def maybe_step(self) -> StepResult | None:
        batch_turns = self.config.trainer.batch_turns
        items = await asyncio.to_thread(self.ready)
        if len(items) < batch_turns:
            return None
        return await self.step(items[:batch_turns])

    async def step(self, items: list[TrainItem]) -> StepResult:
        normalise_steps(items)
        trainer = await asyncio.to_thread(self._trainer)
        before = trainer.snapshot()
        stats = await asyncio.to_thread(trainer.step, items)
        ids = [item.turn_id for item in items]
        if self.config.gate and stats.kl > self.config.gate_max_kl:
            trainer.restore(before)
            reason = (f"publish gate: the step moved the policy {stats.kl:.3f} nats/token, "
                      f"over the bound {self.config.gate_max_kl}")
            self.store.skip(ids, reason)
            log.error(reason)
            return self._remember(StepResult(None, None, stats, "refused", reason))
        version, name = await self._fresh_name()
        staged = self.adapters_dir / f".staging-{name}"
        await asyncio.to_thread(trainer.save, staged, stats)
        path = install(staged, self.adapters_dir, name)
        self.store.stage_adapter(version, name, self.policy, str(path), asdict(stats))
        try:
            for admin in self.admins:  # verified on each; current only once all have it
                await admin.load(name, path)
        except PublishError as exc:
            trainer.restore(before)  # the turns stay untrained: learn from them again
            self.store.set_adapter_status(version, "failed", str(exc))
            log.error("adapter %s not published: %s", name, exc)
            return self._remember(StepResult(version, name, stats, "failed", str(exc)))
        self.store.publish(version, ids, self.policy)
        self.trained_from = version
        log.info("published %s (%d turns, loss %.4f, kl %.4f)", name, len(items), stats.loss,
                 stats.kl)
        return self._remember(StepResult(version, name, stats, "published"))

    async def _fresh_name(self) -> tuple[int, str]:
        """The next version, skipping names a backend already has loaded: a store that
        was reset while vLLM kept running would otherwise reuse a name for different
        weights, which vLLM would keep serving from its cache."""
        version = self.store.next_version()
        taken: set[str] = set()
        for admin in self.admins:
            # An unreachable backend gets the adapter when it is back.
            with contextlib.suppress(Exception):
                taken |= await admin.loaded()
        while version_name(self.policy, version) in taken:
            version += 1
        return version, version_name(self.policy, version)

    def _remember(self, result: StepResult) -> StepResult:
        self.history = [*self.history, {
            "version": result.version, "outcome": result.outcome, "at": time.time(),
            **asdict(result.stats)}][-10:]
        return result

    async def housekeeping(self) -> None:
        """On every backend: reload the current adapter if vLLM lost it (a restart),
        unload versions past their grace period; then delete old directories."""
        rows = self.store.adapters(self.policy)
        for admin in self.admins:
            try:
                loaded = await admin.loaded()
            except Exception as exc:  # that backend is down: the proxy routes around it
                log.warning("backend %s unreachable: %s", admin.url, exc)
                continue
            for row in rows:
                if row["status"] == "current" and row["name"] not in loaded:
                    log.warning("%s lost %s (restarted?): loading it again", admin.url,
                                row["name"])
                    await admin.load(row["name"], Path(row["path"]))
                retired = row["retired_at"] or 0
                if row["status"] == "previous" and \
                        time.time() - retired > self.config.unload_grace:
                    await admin.unload(row["name"])
        for row in rows:
            retired = row["retired_at"] or 0
            if row["status"] == "previous" and time.time() - retired > self.config.unload_grace:
                self.store.set_adapter_status(row["version"], "unloaded")
        prune(self.adapters_dir, self.store.adapters(self.policy), self.config.keep)

    async def backends(self) -> dict[str, list[str]]:
        """The adapter versions of this policy each backend has loaded (for status)."""
        out: dict[str, list[str]] = {}
        for admin in self.admins:
            try:
                names = await admin.loaded()
            except Exception:
                out[admin.url] = ["unreachable"]
                continue
            out[admin.url] = sorted(n for n in names if n.startswith(f"{self.policy}@"))
        return out
