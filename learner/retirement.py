"""Retiring lessons the weights have learned (store -> learner -> vLLM -> store -> the
proxy's memory stops serving them).

Context distillation (judging.py, training.py) teaches the adapter to answer, without a
lesson, as it answers with it. A lesson has been learned when showing it no longer
changes what the adapter says. Each round, for the served lessons not yet checked
against the adapter now serving their owner:

1. held-out prompts: the owner's latest requests that were served lessons and that no
   adapter has trained on (as the client sent them, without the lessons); the check
   waits for ``check_prompts`` of them;
2. the adapter answers each, untold, ``check_samples`` times (vLLM, temperature 1);
3. the teacher's machinery scores each reply under the prompt without the lesson and with
   it (`core.hints`, the placement the proxy serves it in): the mean of
   logπ(reply | prompt) − logπ(reply | prompt + lesson) over the reply's tokens estimates
   KL(adapter ‖ adapter shown the lesson), in nats per token. It is what on-policy
   distillation from that lesson would still have to teach (its advantages are the same
   differences, on the same kind of samples);
4. at most ``retire_kl``: retired, the proxy no longer serves it and the context it cost
   is saved; above: kept, with what was measured, until the next adapter.

A lesson taught again after it was retired serves again (the store reactivates it). The
base model is never checked: a lesson is retired into weights the learner trained. (The
learning benchmark also reads the retired lessons' preferences with the persona's own
detectors: bench/README.md.)
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import Sequence
from typing import Any

from nextstate.core.hints import with_hint
from nextstate.core.routing import Router
from nextstate.core.store import Store
from nextstate.core.store.lessons import RETIRED
from nextstate.core.vllm import VLLMClient, VLLMError
from nextstate.learner.config import MemoryConfig
from nextstate.learner.teacher import TeacherError, score

log = logging.getLogger("nextstate.learner.retirement")


class Retirement:
    def __init__(self, store: Store, vllm: VLLMClient, policy: str, base_model: str,
                 config: MemoryConfig) -> None:
        self.store = store
        self.vllm = vllm  # the teacher's client: the backend's key, retried
        self.router = Router(policy, base_model)
        self.config = config
        self.checks = 0  # lessons checked since the learner started
        self.retired = 0
        self.history: list[dict[str, Any]] = []  # the latest checks: lesson, adapter, KL

    async def check(self) -> list[dict[str, Any]]:
        """One round of checks; returns the lessons retired in it."""
        policy = self.router.policy or ""
        self.router.update(await asyncio.to_thread(self.store.adapters.currents, policy))
        if self.router.current is None and not self.router.personal:
            return []  # no adapter yet: nothing the weights could have learned
        candidates = await asyncio.to_thread(self.store.lessons.to_check,
                                             self.config.checks_per_round * 4)
        due: dict[tuple[str | None, str | None, str], list[dict[str, Any]]] = {}
        taken = 0
        for lesson in candidates:
            model = self.router.route(policy, lesson["user"]) or ""
            if model == self.router.base_model or (lesson["checked"] or {}).get(
                    "adapter") == model:
                continue
            due.setdefault((lesson["tenant"], lesson["user"], model), []).append(lesson)
            taken += 1
            if taken >= self.config.checks_per_round:
                break
        retired = []
        for (tenant, user, model), lessons in due.items():
            try:
                retired += await self._check_scope(tenant, user, model, lessons)
            except (VLLMError, TeacherError) as exc:
                log.warning("retirement check on %s failed: %s", model, exc)
        return retired

    async def _check_scope(self, tenant: str | None, user: str | None, model: str,
                           lessons: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        prompts = await asyncio.to_thread(self.store.lessons.held_out, tenant, user,
                                          self.config.check_prompts)
        if len(prompts) < self.config.check_prompts:
            return []  # too few yet: checked on a later round, with more traffic
        replies = []  # (messages, tools, prompt ids, reply ids, reply logprobs untold)
        for turn in prompts:
            request = turn["request"] or {}
            messages, tools = request.get("messages"), request.get("tools")
            if not isinstance(messages, list) or not messages:
                continue
            ids = await self._tokenize(model, messages, tools)
            for sample in await self._sample(model, ids):
                replies.append((messages, tools, ids, sample,
                                await score(self.vllm, model, ids, sample)))
        if not replies:
            return []
        retired = []
        for lesson in lessons:
            gaps = []
            for messages, tools, _, sample, untold in replies:
                told_ids = await self._tokenize(model, with_hint(messages, lesson["text"]),
                                                tools)
                told = await score(self.vllm, model, told_ids, sample)
                gaps.append(statistics.fmean(u - t for u, t in zip(untold, told,
                                                                   strict=True)))
            kl = statistics.fmean(gaps)
            checked = {"adapter": model, "kl": round(kl, 4), "replies": len(replies),
                       "prompts": len(prompts), "at": time.time()}
            self.checks += 1
            self.history = [*self.history, {"id": lesson["id"], **checked}][-200:]
            if kl <= self.config.retire_kl:
                reason = (f"{model} follows it without being told: KL {kl:.3f} nats/token "
                          f"on {len(replies)} replies to {len(prompts)} held-out prompts "
                          f"(bound {self.config.retire_kl})")
                if await asyncio.to_thread(self.store.lessons.set_status, lesson["id"],
                                           RETIRED, reason, checked=checked):
                    self.retired += 1
                    log.info("lesson %s retired: %s", lesson["id"], reason)
                    retired.append({"id": lesson["id"], "text": lesson["text"][:200],
                                    **checked})
            else:
                await asyncio.to_thread(self.store.lessons.note_check, lesson["id"], checked)
        return retired

    async def _tokenize(self, model: str, messages: list[dict[str, Any]],
                        tools: Any) -> list[int]:
        body: dict[str, Any] = {"model": model, "messages": messages,
                                "add_generation_prompt": True}
        if tools:
            body["tools"] = tools
        return await self.vllm.tokenize(body)

    async def _sample(self, model: str, prompt: list[int]) -> list[list[int]]:
        answer = await self.vllm.completion({
            "model": model, "prompt": prompt, "n": self.config.check_samples,
            "max_tokens": self.config.check_max_tokens, "temperature": 1.0,
            "return_token_ids": True})
        return [list(c["token_ids"]) for c in answer.get("choices") or []
                if c.get("token_ids")]
