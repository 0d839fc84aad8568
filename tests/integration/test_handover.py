"""The hand-over on the real stack: once an adapter serves a user, the proxy serves a
control share of their requests without their lesson and records which arm each turn
was in; the learner judges them, sees that the lesson does not make the replies better
(approved with it or without), and hands the user over to the weights; the proxy then
serves their requests without it (agent -> proxy [memory, control share] -> vLLM ->
store -> learner -> hand-over -> proxy)."""

from __future__ import annotations

import time

import httpx
import pytest

from nextstate.core.store.handover import LESSONS, WEIGHTS
from nextstate.proxy.settings import MemorySettings
from tests.conftest import MODEL_NAME, RETRIEVAL_ROOM_MS
from tests.integration.test_memory import (
    ASK,
    CORRECTION,
    KEYS,
    client,
    corrected_session,
    learner,
    question,
    thanked_session,
)

pytestmark = pytest.mark.integration
SESSIONS = 24  # with a control share of 0.4, both arms get 2 turns but for ~1 run in 10^4


def until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


async def test_a_lesson_that_does_not_help_is_handed_over_and_no_longer_served(
        vllm, start_proxy, toy_model, tmp_path):
    proxy = start_proxy(vllm.url, policy=MODEL_NAME, adapter_poll_seconds=0.1,
                        client_keys=KEYS, memory=MemorySettings(
                            enabled=True, refresh_seconds=0.05, control=0.4,
                            budget_ms=RETRIEVAL_ROOM_MS))
    store = proxy.store()
    lesson, _ = store.lessons.learn(CORRECTION, tenant="team-a", user="team-a:alice",
                                    turn_id=None, context=question(1)[0]["content"])
    store.close()

    def health() -> dict:
        return httpx.get(f"{proxy.url}/health").json()

    def unserved() -> dict:  # why requests went without lessons
        memory = health()["memory"]
        return {why: memory[why] for why in ("unmatched", "slow", "failed", "not_ready")}

    until(lambda: health()["memory"]["lessons"] == 1, "the memory did not follow the store")
    # (Not dropped for failing: the base model's turns here are corrected, which would
    # drop it after 3.)
    work = learner(proxy, vllm, tmp_path, model_dir=toy_model, hand_over_after=2,
                   drop_after=1000, retire=False)
    with client(proxy, "ka", "alice") as alice:
        try:
            # The base model serves alice at first: her lesson, and no arm (there are no
            # weights to hand over to).
            for i in range(3):
                corrected_session(alice, i)
            before = proxy.turns(6)
            assert all(t["lessons"] for t in before), unserved()
            assert all(t["lessons"]["ids"] == [lesson] and "arm" not in t["lessons"]
                       for t in before)
            for _ in range(3):  # judged and trained: an adapter
                await work.step()
                if work.store.adapters.current(MODEL_NAME) is not None:
                    break
            adapter = work.store.adapters.current(MODEL_NAME)
            assert adapter is not None, work.status()
            until(lambda: httpx.get(f"{proxy.base_url}/learner/status", headers={
                "Authorization": "Bearer ka"}).json()["serving"] == adapter["name"],
                "the proxy did not route to the adapter")
            # Every reply is approved, with the lesson or without: it no longer helps.
            for i in range(SESSIONS):
                thanked_session(alice, 10 + i)
            turns = proxy.turns(6 + 2 * SESSIONS, timeout=60)[6:]
            # (The adapter's turns: one sent as the proxy switched may still be the base's.)
            firsts = [t for t in turns if len(t["request"]["messages"]) == 1
                      and t["served_model"] == adapter["name"]]
            assert all(t["lessons"] for t in firsts), unserved()
            assert {t["lessons"]["arm"] for t in firsts} == {LESSONS, WEIGHTS}
            # What the model saw: the lesson in the served arm's prompts only.
            for turn in firsts:
                plain = httpx.post(f"{vllm.url}/tokenize", json={
                    "model": MODEL_NAME, "add_generation_prompt": True,
                    "messages": turn["request"]["messages"]}).json()["tokens"]
                served = turn["lessons"]["arm"] == LESSONS
                assert (turn["prompt_token_ids"] != plain) is served
                assert turn["lessons"]["ids" if served else "withheld"] == [lesson]
            await work.step()
            status = work.memory_status()
        finally:
            await work.close()
        [handed] = status["handed_over"]
        assert (handed["user"], handed["mode"]) == ("team-a:alice", WEIGHTS)
        assert handed["figures"]["with"]["mean"] == handed["figures"]["without"]["mean"] == 1
        until(lambda: health()["memory"]["handed_over"] == 1, "the proxy did not follow")
        counted = health()["memory"]
        for i in range(5):  # not recorded: the user's mode, no control share
            alice.post("/chat/completions", headers={"X-NextState-Record": "off"},
                       json={**ASK, "messages": question(i)}).raise_for_status()
        after = health()["memory"]
    assert after["served"] == counted["served"]
    assert after["withheld"] == counted["withheld"] + 5
