"""Judging and teacher logprobs against the real vLLM (store -> learner -> vLLM)."""

from __future__ import annotations

import httpx
import pytest

from nextstate.core.vllm import VLLMClient
from nextstate.learner.process import Learner, LearnerConfig
from nextstate.learner.teacher import Teacher
from tests.conftest import MODEL_NAME

pytestmark = pytest.mark.integration
# Temperature 1 and top-p 1: the sampling distribution is the model's own, so vLLM's
# processed logprobs and the prompt logprobs of a prefill are the same quantity.
SAMPLE = {"model": MODEL_NAME, "temperature": 1.0, "top_p": 1.0, "max_tokens": 16,
          "seed": 7}
QUESTION = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital of France?"}]


async def test_teacher_logprobs_reproduce_the_recorded_ones_and_move_under_a_hint(vllm, proxy):
    httpx.post(f"{proxy.base_url}/chat/completions", json={**SAMPLE, "messages": QUESTION},
               timeout=60).raise_for_status()
    [turn] = proxy.turns(1)
    tokenized = httpx.post(f"{vllm.url}/tokenize", json={
        "model": MODEL_NAME, "messages": QUESTION, "add_generation_prompt": True}).json()
    assert tokenized["tokens"] == turn["prompt_token_ids"]  # /tokenize == the served prompt

    teacher = Teacher(VLLMClient(vllm.url), MODEL_NAME)
    try:
        same = await teacher.logprobs(turn, None)
        hinted = await teacher.logprobs(turn, "Answer in French, in one word.")
    finally:
        await teacher.close()
    assert len(same) == len(hinted) == len(turn["completion_token_ids"]) > 0
    assert same == pytest.approx(turn["logprobs"], abs=2e-3)
    assert max(abs(a - b) for a, b in zip(same, hinted, strict=True)) > 1e-2


async def test_learner_judges_real_traffic_with_the_rules_judge(vllm, proxy):
    client = httpx.Client(base_url=proxy.base_url, timeout=60)
    first = client.post("/chat/completions", json={**SAMPLE, "messages": QUESTION}).json()
    reply = first["choices"][0]["message"]
    correction = "No, that's wrong. Answer with just the city name."
    client.post("/chat/completions", json={**SAMPLE, "messages": [
        *QUESTION, {"role": "assistant", "content": reply["content"]},
        {"role": "user", "content": correction}]}, headers={"X-Session-Done": "1"})
    turns = proxy.turns(2)
    learner = Learner(LearnerConfig(store_url=proxy.settings.resolved_store_url(),
                                    backends=(vllm.url,), base_model=MODEL_NAME))
    try:
        assert await learner.step() == 2
        assert await learner.step() == 0  # every turn is judged exactly once
        corrected = learner.store.judgments.get(turns[0]["turn_id"])
        last = learner.store.judgments.get(turns[1]["turn_id"])
        status = learner.status()
    finally:
        await learner.close()
    assert corrected["score"] == -1 and corrected["judge"] == "rules"
    assert corrected["hints"] and correction in corrected["hints"][0]
    [teacher] = corrected["teacher_logprobs"]
    assert len(teacher) == len(turns[0]["completion_token_ids"])
    assert (last["score"], last["source"]) == (0, "none")  # the session ended after it
    assert status["counts"]["judged"] == 2
