"""Sampler logprobs the proxy left out, recomputed (store -> learner -> vLLM -> store).

With ``nextstate serve --sampler-logprobs recompute`` the proxy asks vLLM for token ids
only wherever the sampled tokens' logprobs can be had exactly afterwards
(`nextstate.proxy.capture.recomputable`: a temperature of 0 or 1, nothing else shaping
the distribution): that is most of what recording costs on the request path (bench/README,
"The tax"). Such a turn is stored without logprobs and kept out of training
(`core.records.TO_RECOMPUTE`) until this stage, run first in each learner round, scores its
recorded completion under the model name vLLM served it with, in one prefill
(``prompt_logprobs``). Then π_sampler in the importance weight (learner/losses.py) is
what vLLM sampled from, as if it had been recorded.

It must run while that version is still loaded: the current one always is, a retired one
for ``unload_grace`` seconds. A turn whose version is gone by then is marked with why and
never trained on (nothing is guessed); vLLM being unreachable leaves the turn waiting.
Turns with images are never left waiting: a token-id prefill cannot carry them.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from nextstate.core.store import Store
from nextstate.core.vllm import VLLMClient, VLLMRefused, VLLMUnreachable
from nextstate.learner.teacher import TeacherError, score

log = logging.getLogger("nextstate.learner.sampler_logprobs")


@dataclass
class RecomputeReport:
    recomputed: int = 0
    lost: int = 0  # their version was unloaded first, or vLLM could not score them
    waiting: int = 0  # vLLM unreachable: tried again next round
    last_error: str | None = None


async def recompute_pending(store: Store, vllm: VLLMClient, limit: int = 64,
                            concurrency: int = 4) -> RecomputeReport:
    """Recompute the sampler logprobs of up to ``limit`` waiting turns, once."""
    report = RecomputeReport()
    pending = await asyncio.to_thread(store.turns.to_recompute, limit)
    gate = asyncio.Semaphore(concurrency)

    async def one(turn: dict[str, object]) -> None:
        model = str(turn["served_model"] or "")
        prompt = list(turn["prompt_token_ids"] or [])  # type: ignore[call-overload]
        completion = list(turn["completion_token_ids"] or [])  # type: ignore[call-overload]
        async with gate:
            try:
                logprobs = await score(vllm, model, prompt, completion)
            except VLLMUnreachable as exc:
                report.waiting += 1
                report.last_error = str(exc)
                return
            except (VLLMRefused, TeacherError) as exc:
                problem = (f"served by {model}, which vLLM no longer has: its sampler "
                           "logprobs cannot be recomputed"
                           if isinstance(exc, VLLMRefused) and exc.status == 404
                           else f"sampler logprobs not recomputed: {exc}")
                await asyncio.to_thread(store.turns.set_sampler_logprobs, str(turn["id"]),
                                        None, problem)
                report.lost += 1
                report.last_error = problem
                log.warning("turn %s: %s", turn["id"], problem)
                return
        await asyncio.to_thread(store.turns.set_sampler_logprobs, str(turn["id"]), logprobs)
        report.recomputed += 1

    await asyncio.gather(*(one(turn) for turn in pending))
    return report
