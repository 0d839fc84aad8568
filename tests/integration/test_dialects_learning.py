"""The learner on dialect turns, against the real vLLM (agent -(Messages | Responses)->
proxy -> store -> learner -> trainer -> publish).

A dialect turn is recorded as the chat exchange the model saw, so the teacher builds its
hinted prompt from the same conversation with the same template and scores exactly the
recorded completion tokens, and a training step takes the turn as it takes a chat turn.
"""

from __future__ import annotations

import anthropic
import openai
import pytest

from nextstate.core.vllm import VLLMClient
from nextstate.learner.teacher import Teacher
from tests.conftest import MODEL_NAME
from tests.integration.test_learner_training import drain, learner_for

pytestmark = pytest.mark.integration
# Temperature 1 and top-p 1: the recorded logprobs are the model's own distribution's.
SAMPLING = {"temperature": 1.0, "top_p": 1.0}
QUESTION = "What is the capital of France?"
CORRECTION = "No, that's wrong. Answer with just the city name."
DONE = {"X-Session-Done": "1"}


def messages_session(url: str) -> None:
    client = anthropic.Anthropic(base_url=url, api_key="unused")
    ask = {"model": MODEL_NAME, "max_tokens": 12, "system": "You are terse.",
           "extra_body": SAMPLING}
    history = [{"role": "user", "content": QUESTION}]
    reply = client.messages.create(**ask, messages=history)
    history += [{"role": "assistant", "content": [b.model_dump(exclude_none=True)
                                                  for b in reply.content]},
                {"role": "user", "content": CORRECTION}]
    with client.messages.stream(**ask, messages=history, extra_headers=DONE) as stream:
        stream.get_final_message()


def responses_session(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    ask = {"model": MODEL_NAME, "max_output_tokens": 12, "instructions": "You are terse.",
           **SAMPLING}
    first = client.responses.create(**ask, input=QUESTION)
    client.responses.create(**ask, input=CORRECTION, previous_response_id=first.id,
                            extra_headers=DONE)


@pytest.fixture
def policy_proxy(vllm, start_proxy):
    return start_proxy(vllm.url, policy=MODEL_NAME, adapter_poll_seconds=0.1)


async def test_a_hinted_correction_of_a_dialect_turn_trains_by_distillation(
        vllm, policy_proxy, toy_model, tmp_path):
    proxy = policy_proxy
    for _ in range(2):  # a step takes 4 turns (learner_for's batch_turns)
        messages_session(proxy.url)
        responses_session(proxy.url)
    turns = proxy.turns(8)
    firsts = [t for t in turns if t["next_state_status"] == "paired"]
    assert sorted(t["endpoint"] for t in firsts) == ["messages"] * 2 + ["responses"] * 2

    teacher = Teacher(VLLMClient(vllm.url), MODEL_NAME)
    try:
        for turn in firsts:
            same = await teacher.logprobs(turn, None)
            hinted = await teacher.logprobs(turn, "Answer with just the city name.")
            assert len(same) == len(hinted) == len(turn["completion_token_ids"]) > 0
            # the teacher's prompt is the recorded one, token for token
            assert same == pytest.approx(turn["logprobs"], abs=2e-3)
            assert max(abs(a - b) for a, b in zip(same, hinted, strict=True)) > 1e-2
    finally:
        await teacher.close()

    learner = learner_for(proxy, vllm, toy_model, tmp_path, method="opd")
    try:
        await drain(learner)
        judged = [learner.store.judgments.get(t["turn_id"]) for t in firsts]
        status = learner.status()
    finally:
        await learner.close()
    for judgment, turn in zip(judged, firsts, strict=True):
        assert judgment["score"] == -1 and CORRECTION in judgment["hints"][0]
        [scores] = judgment["teacher_logprobs"]
        assert len(scores) == len(turn["completion_token_ids"])
    # Distillation only: a step trains on hinted turns alone, so these are what it used.
    steps = [s for s in status["steps"] if s["outcome"] == "published"]
    assert steps and sum(s["turns"] for s in steps) == 4
