"""The learner process: ``nextstate learn``
(store -> learner -> judge -> trainer -> publish -> vLLM).

A separate process from the proxy, attached to the same store and the same vLLM. It
loops: judge the turns that have their next state (with the memory on, their hints
become lessons the proxy serves); once enough judged turns carry a signal, train a step
and publish the adapter; retire the lessons the adapter has learned, and hand a user over
to the weights once their lessons no longer help (handover.py); report what it is
doing in the store (the proxy's status endpoint and dashboard show it), and to its
observers (Prometheus metrics, experiment trackers: `observers`). Killing it at any
moment loses nothing: all of its state is in the store and the adapter directories.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from nextstate.core.health import learning_health, store_findings
from nextstate.core.lora import AdapterStatus, erase, owns
from nextstate.core.routing import Router
from nextstate.core.store import Store, TurnsForgotten
from nextstate.core.store.facts import loop_facts
from nextstate.core.vllm import VLLMClient
from nextstate.learner import ranks
from nextstate.learner.config import LearnerConfig
from nextstate.learner.handover import HandOvers
from nextstate.learner.judging import JudgingReport, judge_pending
from nextstate.learner.judgment import Judge
from nextstate.learner.lessons import Keeper
from nextstate.learner.multimodal import image_token_id
from nextstate.learner.observers import Observer, close_all, tell
from nextstate.learner.personal import personal_adapters
from nextstate.learner.retirement import Retirement
from nextstate.learner.sampler_logprobs import recompute_pending
from nextstate.learner.teacher import Teacher
from nextstate.learner.training import StepResult, TrainingStage

log = logging.getLogger("nextstate.learner")


def make_judge(config: LearnerConfig) -> Judge:
    if config.judge == "rules":
        from nextstate.learner.rules import RulesJudge

        return RulesJudge()
    if config.judge == "llm":
        from nextstate.learner.llm_judge import LLMJudge, check_key

        model = config.judge_model or f"hosted_vllm/{config.base_model}"
        api_base = config.judge_api_base or (
            f"{config.backend_url}/v1" if config.judge_model is None else None)
        # The backend's own model answers with the backend's key.
        api_key = config.judge_api_key or (
            config.backend_api_key if config.judge_model is None else None)
        check_key(model, api_base, api_key)
        return LLMJudge(model, api_base=api_base, api_key=api_key)
    raise ValueError(f"unknown judge {config.judge!r} (rules or llm)")


@dataclass
class Totals:
    judged: int = 0
    judge_failures: int = 0
    hints: int = 0
    steps: dict[str, int] = field(default_factory=dict)  # steps taken, by outcome
    lessons_learned: int = 0
    lessons_dropped: int = 0
    lessons_retired: int = 0
    memory_switches: int = 0  # askers handed over to the weights, or back to lessons
    # Sampler logprobs the proxy left out (serve --sampler-logprobs recompute): recomputed,
    # and lost (their version was unloaded first; the turns are not trained on).
    logprobs_recomputed: int = 0
    logprobs_lost: int = 0
    recent_errors: list[str] = field(default_factory=list)

    def add(self, report: JudgingReport) -> None:
        self.judged += report.judged
        self.judge_failures += report.failed
        self.hints += report.hints
        self.lessons_learned += report.lessons_learned
        self.lessons_dropped += report.lessons_dropped
        if report.last_error:
            self.recent_errors = [*self.recent_errors, report.last_error][-10:]


class Learner:
    def __init__(self, config: LearnerConfig, judge: Judge | None = None,
                 observers: Sequence[Observer] = ()) -> None:
        self.config = config
        self.observers = list(observers)
        self.policy = config.policy or config.base_model
        self.store = Store(config.store_url)
        self.judge = judge or make_judge(config)
        router = Router(self.policy, config.base_model) if config.teacher == "policy" else None
        key = config.backend_api_key
        # A vision-language model's turns with images are scored with its image token.
        image_token = image_token_id(config.model_dir) if config.model_dir else None
        self.teacher = Teacher(VLLMClient(config.backend_url, key, timeout=120.0),
                               config.base_model, router=router, image_token=image_token)
        self.vllms = [VLLMClient(url, key) for url in config.backends]
        self.training: TrainingStage | None = None
        if config.model_dir is not None:
            adapters_dir = config.adapters_dir or config.model_dir.parent / "adapters"
            self.training = TrainingStage(self.store, config.model_dir, self.policy,
                                          self.vllms, adapters_dir, config.training)
        memory = config.memory
        self.keeper = Keeper(self.store.lessons, memory)
        self.retirement: Retirement | None = None
        if self.training is not None and memory.retire:
            self.retirement = Retirement(self.store, self.teacher.vllm, self.policy,
                                         config.base_model, memory)
        self.handovers = (HandOvers(self.store.handover, memory.hand_over_after)
                          if memory.hand_over_after else None)
        self.retired: list[dict[str, Any]] = []  # the latest lessons retired, for status
        self.totals = Totals()
        self.started_at = time.time()
        self.state = "idle"
        self.backends: dict[str, list[str]] = {}  # adapter versions loaded, per backend
        self.erased: set[int] = set()  # forgotten versions gone from disk and every backend
        self._status: dict[str, Any] | None = None  # as last computed (see _set_state)
        # Observers are told and closed one call at a time: a round cancelled by Ctrl-C
        # leaves its update running in its thread, and closing a tracker (wandb's finish)
        # while it still logs must wait for it.
        self._observing = threading.Lock()

    async def close(self) -> None:
        await asyncio.to_thread(self._observe, close_all, self.observers)
        await self.teacher.close()
        for vllm in self.vllms:
            await vllm.aclose()
        self.store.close()

    async def step(self) -> int:
        """One round of work; returns how much it did (turns judged, steps trained)."""
        ranks.keep_alive()  # every round: the other training processes (if any) wait on us
        # First, while the versions that served them are surely still loaded.
        recomputed = await recompute_pending(self.store, self.teacher.vllm)
        self.totals.logprobs_recomputed += recomputed.recomputed
        self.totals.logprobs_lost += recomputed.lost
        if recomputed.lost and recomputed.last_error:
            self._error(recomputed.last_error)
        await self._set_state("judging")
        if self.teacher.router is not None:  # --teacher policy: follow what serves whom
            self.teacher.router.update(
                await asyncio.to_thread(self.store.adapters.currents, self.policy))
        report = await judge_pending(self.store.judgments, self.judge, self.teacher,
                                     self.config.judging, self.keeper)
        self.totals.add(report)
        if self.handovers is not None and report.judged:
            self.totals.memory_switches += len(await asyncio.to_thread(self.handovers.check))
        done = report.judged + report.failed + recomputed.recomputed + recomputed.lost
        result: StepResult | None = None
        await self._erase_forgotten()  # before housekeeping looks at what vLLM has
        if self.training is not None:
            await self.training.housekeeping()
            await self._set_state("training")
            try:
                result = await self.training.maybe_step()
            except TurnsForgotten as exc:
                # The trainer stepped on turns that are gone: it must not go on from
                # those weights, so the lane's next step reads its adapter (or, for a
                # user without one now, the shared adapter) from disk again.
                self.training.loaded = None
                log.warning("step discarded: %s", exc)
                self._error(f"step discarded: {exc}")
                result = None
                done += 1
            self.backends = await self.training.backends()
            if result is not None:
                done += 1
                self.totals.steps[result.outcome] = self.totals.steps.get(result.outcome, 0) + 1
                if result.error:
                    self._error(result.error)
        if self.retirement is not None:
            await self._set_state("checking lessons")
            done += await self.check_lessons()
        await self._set_state("idle", report=True)
        if self.observers:
            step = self.training.history[-1] if self.training and result else None
            await asyncio.to_thread(self._observe, tell, self.observers, self._status or {},
                                    step)
        return done

    async def check_lessons(self) -> int:
        """One round of retirement checks (``checks_per_round`` lessons at most); returns
        the lessons retired. A round a second: between training steps a deployed learner
        checks every lesson against the adapter now serving its owner."""
        if self.retirement is None:
            return 0
        retired = await self.retirement.check()
        self.totals.lessons_retired += len(retired)
        self.retired = [*self.retired, *retired][-10:]
        return len(retired)

    def _observe(self, call: Callable[..., None], *args: Any) -> None:
        with self._observing:
            call(*args)

    async def _erase_forgotten(self) -> None:
        """Unload and delete the versions of forgotten users (see `forget`) not yet gone
        everywhere: forgotten through the proxy's admin endpoint, a backend was down when
        ``nextstate forget`` ran, or a step published one while its turns were being
        forgotten."""
        versions = await asyncio.to_thread(self.store.adapters.versions)
        rows = [r for r in versions if r["status"] == AdapterStatus.FORGOTTEN
                and r["version"] not in self.erased and owns(self.policy, r["policy"])]
        if not rows:
            return
        erased = await erase(rows, self.vllms)
        if erased.unloaded or erased.directories:
            log.info("erased forgotten adapters: unloaded %s, deleted %s", erased.unloaded,
                     erased.directories)
        if erased.complete:
            self.erased |= {r["version"] for r in rows}

    def _error(self, error: str) -> None:
        self.totals.recent_errors = [*self.totals.recent_errors, error][-10:]

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        log.info("learner started: judge %s, store %s", self.judge.name,
                 self.config.store_url)
        while not stop.is_set():
            try:
                busy = await self.step()
            except Exception as exc:  # the store or vLLM is away: report, wait, go on
                log.exception("learner round failed")
                self._error(f"{type(exc).__name__}: {exc}")
                busy = 0
            if not busy:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.config.poll_seconds)

    def status(self) -> dict[str, Any]:
        current = self.store.adapters.current(self.policy)
        training = self.config.training.trainer
        judgments = self.store.judgments
        return {
            "state": self.state, "pid": os.getpid(), "started_at": self.started_at,
            "policy": self.policy,
            "judge": self.judge.name, "teacher": self.teacher.model_for({}),
            "method": training.method if self.training else None,
            # Training processes (torchrun), and whether each holds a shard of the model.
            "ranks": ranks.world_size(), "sharded": training.shard,
            "batch_turns": training.batch_turns,
            "gate_max_kl": self.config.training.gate_max_kl,
            "counts": {**judgments.counts(), "ready": judgments.ready_count(training.method),
                       "trained": judgments.trained_count()},
            "rewards": judgments.reward_stats(),
            "adapter": {"name": current["name"], "version": current["version"],
                        "published_at": current["published_at"]} if current else None,
            "personal_after": self.config.training.personal_min_turns,
            "personal": personal_adapters(self.store.adapters, self.policy),
            "steps": self.training.history if self.training else [],
            "backends": self.backends,
            "totals": asdict(self.totals),
            "lora_rank": training.lora_rank,
            "memory": self.memory_status(),
        }

    def memory_status(self) -> dict[str, Any]:
        """The lessons: how many in each state, and the latest retired and dropped, with
        why (a retirement says what it measured on which adapter)."""
        lessons = self.store.lessons
        events = lessons.events(20)
        return {"learning": self.config.memory.learn,
                "retiring": self.retirement is not None,
                "counts": lessons.counts(),
                "retired": [e for e in events if e["status"] == "retired"][:10],
                "dropped": [e for e in events if e["status"] == "dropped"][:10],
                "checks": self.retirement.checks if self.retirement is not None else 0,
                # dropped since the learner started because the base model ignores them
                "ignored": self.retirement.ignored if self.retirement is not None else 0,
                "waiting": self.retirement.waiting if self.retirement is not None else [],
                # askers whose lessons the weights took over (and why), the latest changes
                "handed_over": self.store.handover.handed_over(limit=10),
                "handed_over_count": self.store.handover.count(),
                "switches": self.handovers.switches if self.handovers is not None else []}

    def health(self, report: dict[str, Any]) -> dict[str, Any]:
        """learning / stalled / blocked, and why: what doctor says from the store, over
        the last day's turns (`nextstate.core.health`)."""
        now = time.time()
        facts = loop_facts(self.store.db.engine, since=now - 86400)
        return learning_health(store_findings(facts, {**report, "updated_at": now}, now),
                               report)

    async def _set_state(self, state: str, *, report: bool = False) -> None:
        """Tell the store what the learner is doing, off the event loop. The full status
        (~10 queries) is computed once a round (``report``, at its end) or when there is
        none yet; a state change in between rewrites only the state field of the last one."""
        self.state = state
        await asyncio.to_thread(self._write_status, report)

    def _write_status(self, full: bool) -> None:
        try:
            if full or self._status is None:
                self._status = self.status()
                self._status["health"] = self.health(self._status)
            else:
                self._status = {**self._status, "state": self.state}
            self.store.status.write(self._status)
        except Exception as exc:  # status is best effort; the work is not
            log.warning("could not write learner status: %s", exc)
