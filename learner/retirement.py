"""Retiring lessons the weights have learned (store -> learner -> vLLM -> store -> the
proxy's memory stops serving them).

Context distillation (judging.py, training.py) teaches the adapter to answer, without a
lesson, as it answers with it. A lesson has been learned when showing it no longer
changes what the adapter says. Each round, for up to ``checks_per_round`` active lessons
not yet checked against the adapter now serving their owner, the least recently checked
first (store.lessons.to_check), served or not: the proxy serves one lesson a request, so
most of a scope's lessons are reserves that a better-matching one outranks, and a reserve
is served the moment the one above it retires; checked beforehand, one the weights
already follow never costs context. A check's replies go to vLLM together, to batch.
A round that found nothing due is not repeated until an adapter or a lesson changes.

1. held-out prompts: the owner's latest requests that lessons fit (served with them, or
   held back: handover.py) and that no adapter has trained on (as the client sent them,
   without the lessons); the check waits for ``check_prompts`` of them;
2. the adapter answers each, untold, ``check_samples`` times (vLLM, temperature 1);
3. the teacher's machinery scores each reply under the prompt without the lesson and with
   it (`core.hints`, the placement the proxy serves it in): the mean of
   logπ(reply | prompt) − logπ(reply | prompt + lesson) over the reply's tokens estimates
   KL(adapter ‖ adapter shown the lesson), in nats per token. It is what on-policy
   distillation from that lesson would still have to teach (its advantages are the same
   differences, on the same kind of samples);
4. above ``retire_kl``: kept, with what was measured, until the next adapter;
5. at most ``retire_kl``: the same measure on the base model (its own replies, untold and
   told) tells a lesson the weights learned from one the model ignores. A small KL on
   the adapter means only that showing the lesson no longer changes its replies; if
   showing it never changed the base model's either (at most ``ignore_kl``),
   nothing was learned: the lesson is dropped as ignored (worded in a way the model does
   not follow, or asking for what it does anyway). Otherwise it is retired: the proxy no
   longer serves it and the context it cost is saved. The base model is checked once
   per lesson, only when the adapter passes.

A lesson taught again after it was retired serves again (the store reactivates it). (The
learning benchmark also reads the retired lessons' preferences with the persona's own
detectors: bench/README.md.)
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from nextstate.core.hints import with_hint
from nextstate.core.routing import Router
from nextstate.core.store import Store
from nextstate.core.store.lessons import DROPPED, RETIRED, scope_label
from nextstate.core.vllm import VLLMClient, VLLMError
from nextstate.learner.config import MemoryConfig
from nextstate.learner.teacher import TeacherError, score

log = logging.getLogger("nextstate.learner.retirement")

SCAN = 2000  # active lessons a round looks through at most for ones due a check
PAGE = 250  # ... this many at a time
Key = tuple[str | None, str | None, str]  # a scope (tenant, user) and the adapter serving it


class Reply(NamedTuple):
    """A model's own reply to a held-out prompt: the prompt, the reply's token ids and
    their logprobs untold."""

    messages: list[dict[str, Any]]
    tools: Any
    sample: list[int]
    untold: list[float]


class Retirement:
    def __init__(self, store: Store, vllm: VLLMClient, policy: str, base_model: str,
                 config: MemoryConfig) -> None:
        self.store = store
        self.vllm = vllm  # the teacher's client: the backend's key, retried
        self.router = Router(policy, base_model)
        self.config = config
        self.checks = 0  # lessons checked since the learner started
        self.retired = 0
        self.ignored = 0  # dropped: the base model, told, did not change its replies either
        self.history: list[dict[str, Any]] = []  # the latest checks: lesson, adapter, KL
        # The scopes the last round put off, and why (status: why nothing retires yet).
        self.waiting: list[str] = []
        # The adapters and lessons as they were when a round found nothing due: until
        # either changes, the next rounds have nothing to look for (the learner runs a
        # round a second).
        self.idle: tuple[Any, ...] | None = None

    async def check(self) -> list[dict[str, Any]]:
        """One round of checks; returns the lessons retired in it."""
        policy = self.router.policy or ""
        self.router.update(await asyncio.to_thread(self.store.adapters.currents, policy))
        if self.router.current is None and not self.router.personal:
            return []  # no adapter yet: nothing the weights could have learned
        state = (self.router.current, sorted(self.router.personal.items()),
                 await asyncio.to_thread(self.store.lessons.version))
        if state == self.idle:
            return []
        self.waiting = []
        due = await self._due(policy)
        # A scope waiting for held-out prompts gets them from new turns, which change
        # neither the adapters nor the lessons: look again next round.
        self.idle = state if not due and not self.waiting else None
        retired = []
        for key, (prompts, lessons) in due.items():
            try:
                retired += await self._check_scope(key, prompts, lessons)
            except (VLLMError, TeacherError) as exc:
                log.warning("retirement check on %s failed: %s", key[2], exc)
        return retired

    async def _due(self, policy: str) -> dict[Key, tuple[list[dict[str, Any]],
                                                         list[dict[str, Any]]]]:
        """Up to ``checks_per_round`` lessons due a check, by scope and the adapter serving
        it, each scope with its held-out prompts. Pages past the lessons no adapter
        serves, those already checked against the adapter serving their owner, and those
        of a scope without enough held-out prompts yet."""
        due: dict[Key, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
        waiting: set[Key] = set()
        taken = 0
        page = max(self.config.checks_per_round * 4, PAGE)
        for offset in range(0, SCAN, page):
            candidates = await asyncio.to_thread(self.store.lessons.to_check, page, offset)
            for lesson in candidates:
                model = self.router.route(policy, lesson["user"]) or ""
                if model == self.router.base_model or (lesson["checked"] or {}).get(
                        "adapter") == model:
                    continue
                key = (lesson["tenant"], lesson["user"], model)
                if key in waiting:
                    continue
                if key not in due:
                    prompts = await self._held_out(lesson["tenant"], lesson["user"])
                    if not prompts:
                        waiting.add(key)
                        continue
                    due[key] = (prompts, [])
                due[key][1].append(lesson)
                taken += 1
                if taken >= self.config.checks_per_round:
                    return due
            if len(candidates) < page:
                break
        return due

    async def _held_out(self, tenant: str | None, user: str | None) -> list[dict[str, Any]]:
        """The scope's held-out prompts; none (and why, in ``waiting``) while it has fewer
        than ``check_prompts``: its lessons are checked on a later round."""
        prompts = await asyncio.to_thread(self.store.lessons.held_out, tenant, user,
                                          self.config.check_prompts)
        if len(prompts) < self.config.check_prompts:
            self.waiting.append(f"{scope_label(tenant, user)}: {len(prompts)} of "
                                f"{self.config.check_prompts} held-out prompts (requests "
                                "lessons fit, not trained on, not answering a correction)")
            return []
        return prompts

    async def _check_scope(self, key: Key, prompts: list[dict[str, Any]],
                           lessons: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        tenant, user, model = key
        scope = scope_label(tenant, user)
        replies = await self._replies(model, prompts)
        if not replies:
            self.waiting.append(f"{scope}: {model} gave no reply to sample")
            return []
        base_replies: list[Reply] = []  # sampled once, if a lesson needs them
        retired = []
        for lesson in lessons:
            kl = await self._kl(model, replies, lesson["text"])
            checked: dict[str, Any] = {"adapter": model, "kl": round(kl, 4),
                                       "replies": len(replies), "prompts": len(prompts),
                                       "at": time.time()}
            self.checks += 1
            if kl <= self.config.retire_kl and self.config.ignore_kl > 0:
                base_replies = base_replies or await self._replies(self.router.base_model,
                                                                   prompts)
                checked["base_kl"] = round(await self._kl(
                    self.router.base_model, base_replies, lesson["text"]), 4)
            self.history = [*self.history, {"id": lesson["id"], **checked}][-200:]
            if kl > self.config.retire_kl:
                await asyncio.to_thread(self.store.lessons.note_check, lesson["id"], checked)
                continue
            status, reason = self._verdict(checked)
            if not await asyncio.to_thread(self.store.lessons.set_status, lesson["id"],
                                           status, reason, checked=checked):
                continue  # pinned meanwhile
            log.info("lesson %s %s: %s", lesson["id"], status, reason)
            if status == DROPPED:
                self.ignored += 1
                continue
            self.retired += 1
            retired.append({"id": lesson["id"], "text": lesson["text"][:200], **checked})
        return retired

    def _verdict(self, checked: dict[str, Any]) -> tuple[str, str]:
        """(status, why) of a lesson the adapter follows untold (see the module's step 5)."""
        model, kl, base_kl = checked["adapter"], checked["kl"], checked.get("base_kl")
        if base_kl is not None and base_kl <= self.config.ignore_kl:
            return DROPPED, (f"ignored: told, the base model changes its replies by KL "
                             f"{base_kl:.3f} nats/token (bound {self.config.ignore_kl}) and "
                             f"{model} by {kl:.3f}; it never changed what the model says")
        base = "" if base_kl is None else f"; the base model, told, {base_kl:.3f}"
        return RETIRED, (f"{model} follows it without being told: KL {kl:.3f} nats/token "
                         f"on {checked['replies']} replies to {checked['prompts']} held-out "
                         f"prompts (bound {self.config.retire_kl}{base})")

    async def _replies(self, model: str, prompts: Sequence[dict[str, Any]]) -> list[Reply]:
        """``model``'s own replies to the prompts, untold, with their logprobs (the
        prompts at once, so that vLLM batches them)."""
        async def answer(turn: dict[str, Any]) -> list[Reply]:
            request = turn["request"] or {}
            messages, tools = request.get("messages"), request.get("tools")
            if not isinstance(messages, list) or not messages:
                return []
            ids = await self._tokenize(model, messages, tools)
            samples = await self._sample(model, ids)
            untold = await asyncio.gather(*(score(self.vllm, model, ids, s) for s in samples))
            return [Reply(messages, tools, s, u) for s, u in zip(samples, untold, strict=True)]

        return [r for replies in await asyncio.gather(*(answer(t) for t in prompts))
                for r in replies]

    async def _kl(self, model: str, replies: Sequence[Reply], lesson: str) -> float:
        """KL(model ‖ model shown the lesson), nats per token, estimated on the model's
        own replies: the mean over replies of the mean over their tokens of
        logπ(token | prompt) − logπ(token | prompt + lesson). Scored all at once."""
        told_prompts: dict[int, list[int]] = {}  # a prompt's replies share its told ids
        for reply in replies:
            if id(reply.messages) not in told_prompts:
                told_prompts[id(reply.messages)] = await self._tokenize(
                    model, with_hint(reply.messages, lesson), reply.tools)
        told = await asyncio.gather(*(score(self.vllm, model, told_prompts[id(r.messages)],
                                            r.sample) for r in replies))
        return statistics.fmean(
            statistics.fmean(u - t for u, t in zip(reply.untold, scores, strict=True))
            for reply, scores in zip(replies, told, strict=True))

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
