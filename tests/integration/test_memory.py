"""The memory on the real stack: a correction becomes a lesson, the proxy serves it to
that user's next matching request (and to no other tenant), the record says so, a
training step distils it (teacher with the lesson, student without), and once the
adapter is checked and the lesson retired the proxy stops serving it
(agent -> proxy [memory] -> vLLM -> store -> learner -> lessons -> proxy)."""

from __future__ import annotations

import time

import httpx
import pytest

from nextstate.core.hints import HINT_MARKER, with_hint
from nextstate.learner.config import MemoryConfig
from nextstate.learner.process import Learner, LearnerConfig
from nextstate.learner.trainer import TrainerConfig
from nextstate.learner.training import TrainingConfig
from nextstate.proxy.settings import MemorySettings
from tests.conftest import MODEL_NAME, RETRIEVAL_ROOM_MS

pytestmark = pytest.mark.integration
KEYS = (("team-a", "ka"), ("team-b", "kb"))
ASK = {"model": MODEL_NAME, "temperature": 1.0, "max_tokens": 12}
CORRECTION = "No, that is wrong: show every step and end with some encouragement."


def question(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Ava has {i} apples and buys {i + 2} more. "
                                        "How many apples does Ava have now?"}]


def client(proxy, key: str, user: str) -> httpx.Client:
    return httpx.Client(base_url=proxy.base_url, timeout=120, headers={
        "Authorization": f"Bearer {key}", "X-NextState-User": user})


def corrected_session(http: httpx.Client, i: int) -> None:
    first = http.post("/chat/completions", json={**ASK, "messages": question(i)})
    first.raise_for_status()
    reply = first.json()["choices"][0]["message"]["content"]
    http.post("/chat/completions", headers={"X-Session-Done": "1"}, json={
        **ASK, "messages": [*question(i), {"role": "assistant", "content": reply},
                            {"role": "user", "content": CORRECTION}]}).raise_for_status()


def thanked_session(http: httpx.Client, i: int) -> None:
    first = http.post("/chat/completions", json={**ASK, "messages": question(i)})
    first.raise_for_status()
    reply = first.json()["choices"][0]["message"]["content"]
    http.post("/chat/completions", headers={"X-Session-Done": "1"}, json={
        **ASK, "messages": [*question(i), {"role": "assistant", "content": reply},
                            {"role": "user", "content": "Thanks, that's perfect!"}]},
              ).raise_for_status()


def learner(proxy, vllm, tmp_path, *, model_dir=None, **memory) -> Learner:
    trainer = TrainerConfig(method="opd", batch_turns=3)
    return Learner(LearnerConfig(
        store_url=proxy.settings.resolved_store_url(), backends=(vllm.url,),
        base_model=MODEL_NAME, model_dir=model_dir, adapters_dir=tmp_path / "adapters",
        training=TrainingConfig(trainer=trainer, unload_grace=0.0),
        memory=MemoryConfig(learn=True, **memory)))


def indexed(proxy, count: int) -> None:
    deadline = time.monotonic() + 10
    while httpx.get(f"{proxy.url}/health").json()["memory"]["lessons"] != count:
        assert time.monotonic() < deadline, "the proxy's memory did not follow the store"
        time.sleep(0.05)


@pytest.fixture
def memory_proxy(vllm, start_proxy):
    return start_proxy(vllm.url, policy=MODEL_NAME, adapter_poll_seconds=0.1,
                       client_keys=KEYS,
                       # Every request its lessons (the control share: test_handover.py).
                       memory=MemorySettings(enabled=True, refresh_seconds=0.05,
                                             control=0.0, budget_ms=RETRIEVAL_ROOM_MS))


async def test_a_correction_is_served_as_a_lesson_to_that_user_only_and_recorded(
        vllm, memory_proxy, tmp_path):
    proxy = memory_proxy
    with client(proxy, "ka", "alice") as alice:
        corrected_session(alice, 1)
    proxy.turns(2)
    judge = learner(proxy, vllm, tmp_path)
    try:
        await judge.step()
        [lesson] = judge.store.lessons.find(every_tenant=True)
    finally:
        await judge.close()
    assert (lesson["tenant"], lesson["user"], lesson["text"]) == (
        "team-a", "team-a:alice", CORRECTION)
    indexed(proxy, 1)
    asked = {"messages": question(7)}
    with client(proxy, "ka", "alice") as alice, client(proxy, "kb", "alice") as other, \
            client(proxy, "ka", "bob") as bob:
        for http in (alice, other, bob):
            http.post("/chat/completions", json={**ASK, **asked}).raise_for_status()
    turns = proxy.turns(5)[2:]
    served = {t["user"]: t for t in turns}
    mine = served["team-a:alice"]
    assert mine["lessons"]["ids"] == [lesson["id"]]
    assert mine["lessons"]["hint"] == CORRECTION and mine["lessons"]["message"] == 0
    assert mine["request"]["messages"] == asked["messages"]  # the client's own
    # The recorded prompt is what the model saw: the question with the lesson after the
    # teacher's hint marker, exactly as vLLM tokenizes it.
    seen = httpx.post(f"{vllm.url}/tokenize", json={
        "model": MODEL_NAME, "add_generation_prompt": True,
        "messages": with_hint(asked["messages"], CORRECTION)}).json()["tokens"]
    assert mine["prompt_token_ids"] == seen
    assert served["team-b:alice"]["lessons"] is None  # another tenant's alice
    assert served["team-a:bob"]["lessons"] is None  # another user of the same tenant
    assert len(served["team-b:alice"]["prompt_token_ids"]) < len(seen)


async def test_a_step_distils_the_lessons_and_a_retired_lesson_is_no_longer_served(
        vllm, memory_proxy, toy_model, tmp_path):
    proxy = memory_proxy
    with client(proxy, "ka", "alice") as alice:
        corrected_session(alice, 1)
        proxy.turns(2)
        # A bound no reply can miss: the check runs for real on the adapter, and retires
        # (the base model's check, which tells learned from ignored, is off: the test's
        # toy follows no lesson; tests/learner/test_retirement.py has that check).
        work = learner(proxy, vllm, tmp_path, model_dir=toy_model, retire_kl=1e6,
                       ignore_kl=0, check_prompts=2, check_samples=2)
        trained: list = []
        original = work.training.step

        async def spy(items, lane=None):
            trained.extend(items)
            return await original(items, lane)

        work.training.step = spy
        try:
            await work.step()  # judged; a lesson; no batch yet
            [lesson] = work.store.lessons.find(every_tenant=True)
            indexed(proxy, 1)
            for i in (3, 4):  # served with the lesson; the user is pleased
                thanked_session(alice, i)
            turns = proxy.turns(6, timeout=60)
            assert len(turns) == 6
            for _ in range(3):  # judged, distilled: an adapter
                await work.step()
                if work.store.adapters.current(MODEL_NAME) is not None:
                    break
            assert work.store.adapters.current(MODEL_NAME) is not None, work.status()
            assert work.store.lessons.get(lesson["id"])["status"] == "active"
            # Held-out prompts for the check: requests served the lesson, never trained on.
            for i in (5, 6):
                alice.post("/chat/completions", json={**ASK, "messages": question(i)}
                           ).raise_for_status()
            held_out = proxy.turns(8, timeout=60)[6:]
            assert [bool(t["lessons"]) for t in held_out] == [True, True], \
                httpx.get(f"{proxy.url}/health").json()["memory"]
            await work.step()
            status = work.status()["memory"]
            checks = work.retirement.history if work.retirement else None
        finally:
            await work.close()
        served = [t for t in turns if t["lessons"]]
        assert len(served) == 2
        by_id = {item.turn_id: item for item in trained}
        for turn in served:
            item = by_id[turn["turn_id"]]
            own = httpx.post(f"{vllm.url}/tokenize", json={
                "model": MODEL_NAME, "add_generation_prompt": True,
                "messages": turn["request"]["messages"]}).json()["tokens"]
            # Student: the prompt without the lesson; teacher: with it (the recorded one).
            assert item.prompt_ids == own and item.context
            assert item.prompt_ids != turn["prompt_token_ids"]
            assert item.teacher_logprobs is not None
            assert len(item.teacher_logprobs) == len(turn["completion_token_ids"])
        assert status["counts"]["retired"] == 1, (status, checks)
        assert status["retired"][0]["id"] == lesson["id"]
        assert f"{MODEL_NAME}@" in status["retired"][0]["status_reason"]
        indexed(proxy, 0)
        alice.post("/chat/completions", json={**ASK, "messages": question(9)}).raise_for_status()
        last = proxy.turns(9)[-1]
        assert last["lessons"] is None and last["request"]["messages"] == question(9)
        assert HINT_MARKER not in str(last["response"])
