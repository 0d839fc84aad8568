"""The learning benchmark's memory arms: what they need beyond the training arms
(simulated user -> proxy [memory] -> vLLM; learner -> lessons -> the proxy's index).

- `Arm`: what a method name asks for: ``memory`` (lessons only: the learner judges and
  remembers, never trains), ``memory+combined`` (lessons, and the combined method
  distilling them into the adapter, which retires them), or a training method alone.
- `until_indexed`: the proxy serves what the learner just learned before anyone is
  asked again (its index follows the store every 50 ms here).
- `lesson_counts`, `injected_tokens`: what the memory holds after a step and what it cost
  the step's traffic, in prompt tokens a request (the recorded prompt, lessons included,
  against the client's own request as vLLM tokenizes it).
"""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import dataclass

import httpx

from nextstate.core.store import Store
from nextstate.core.store.handover import memory_version
from nextstate.core.vllm import VLLMClient
from nextstate.learner.config import Method


@dataclass(frozen=True)
class Arm:
    name: str
    method: Method | None  # the training method; None: the memory alone, no training
    memory: bool

    @property
    def trains(self) -> bool:
        return self.method is not None


def arm(name: str) -> Arm:
    if name == "memory":
        return Arm(name, None, True)
    if name.startswith("memory+"):
        return Arm(name, name.removeprefix("memory+"), True)  # type: ignore[arg-type]
    return Arm(name, name, False)  # type: ignore[arg-type]


async def until_indexed(client: httpx.AsyncClient, proxy_url: str, store: Store,
                        timeout: float = 10.0) -> None:
    """Wait until the proxy's memory has read the store's lessons as they are now."""
    want = await asyncio.to_thread(memory_version, store.lessons, store.handover)
    for _ in range(int(timeout / 0.05)):
        memory = (await client.get(f"{proxy_url}/health")).json().get("memory") or {}
        if memory.get("version") == want:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the proxy's memory did not follow the store ({want}) in {timeout} s")


def lesson_counts(store: Store) -> dict[str, int]:
    """Lessons by status, and the askers whose lessons were handed over to the weights."""
    return {**store.lessons.counts(), "handed_over": store.handover.count()}


async def injected_tokens(store: Store, vllm_url: str, model: str, since: float,
                          until: float) -> dict[str, float]:
    """Over the traffic turns recorded in [since, until): the mean prompt tokens the
    lessons added a request (0 for requests served without), and the share served
    with lessons."""
    turns = [t for t in await asyncio.to_thread(lambda: list(store.turns.iterate()))
             if since <= t["created_at"] < until and t["prompt_token_ids"]]
    if not turns:
        return {"mean": 0.0, "served": 0.0, "requests": 0.0}
    vllm = VLLMClient(vllm_url)
    added = []
    try:
        for turn in turns:
            if not turn.get("lessons"):
                added.append(0)
                continue
            own = await vllm.tokenize({"model": model, "add_generation_prompt": True,
                                       "messages": turn["request"]["messages"]})
            added.append(len(turn["prompt_token_ids"]) - len(own))
    finally:
        await vllm.aclose()
    return {"mean": statistics.fmean(added),
            "served": sum(1 for a in added if a) / len(added),
            "requests": float(len(added))}
