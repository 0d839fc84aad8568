"""The hand-over on the real stack: the proxy serves a control share of a user's
requests without their lesson and records which arm each turn was in; the learner judges
them, sees that the lesson does not make the replies better, and hands the user over to
the weights; the proxy then serves their requests without it (agent -> proxy [memory,
control share] -> vLLM -> store -> learner -> hand-over -> proxy)."""

from __future__ import annotations

import time

import httpx
import pytest

from nextstate.core.store.handover import LESSONS, WEIGHTS
from nextstate.proxy.settings import MemorySettings
from tests.conftest import MODEL_NAME
from tests.integration.test_memory import (
    ASK,
    CORRECTION,
    KEYS,
    client,
    corrected_session,
    learner,
    question,
)

pytestmark = pytest.mark.integration
SESSIONS = 24  # with a control share of 0.4, both arms get 2 turns but for ~1 run in 10^4


async def test_a_lesson_that_does_not_help_is_handed_over_and_no_longer_served(
        vllm, start_proxy, tmp_path):
    proxy = start_proxy(vllm.url, policy=MODEL_NAME, client_keys=KEYS, memory=MemorySettings(
        enabled=True, refresh_seconds=0.05, control=0.4))
    store = proxy.store()
    lesson, _ = store.lessons.learn(CORRECTION, tenant="team-a", user="team-a:alice",
                                    turn_id=None, context=question(1)[0]["content"])
    store.close()
    with client(proxy, "ka", "alice") as alice:
        deadline = time.monotonic() + 10
        while httpx.get(f"{proxy.url}/health").json()["memory"]["lessons"] != 1:
            assert time.monotonic() < deadline, "the proxy's memory did not follow the store"
            time.sleep(0.05)
        # Every reply is corrected, with the lesson or without: it does not help.
        for i in range(SESSIONS):
            corrected_session(alice, i)
        turns = proxy.turns(2 * SESSIONS)
        firsts = [t for t in turns if len(t["request"]["messages"]) == 1]
        arms = {t["lessons"]["arm"] for t in firsts}
        assert arms == {LESSONS, WEIGHTS}
        # What the model saw: the lesson in the served arm's prompts, not in the other's.
        for turn in firsts:
            plain = httpx.post(f"{vllm.url}/tokenize", json={
                "model": MODEL_NAME, "add_generation_prompt": True,
                "messages": turn["request"]["messages"]}).json()["tokens"]
            served = turn["lessons"]["arm"] == LESSONS
            assert (turn["prompt_token_ids"] != plain) is served
            assert turn["lessons"]["ids" if served else "withheld"] == [lesson]
        # (Not dropped for failing: its corrected turns would drop it after 3.)
        work = learner(proxy, vllm, tmp_path, hand_over_after=2, drop_after=1000)
        try:
            await work.step()
            status = work.memory_status()
        finally:
            await work.close()
        [handed] = status["handed_over"]
        assert (handed["user"], handed["mode"]) == ("team-a:alice", WEIGHTS)
        assert handed["figures"]["with"]["mean"] == handed["figures"]["without"]["mean"] == -1
        deadline = time.monotonic() + 10
        while httpx.get(f"{proxy.url}/health").json()["memory"]["handed_over"] != 1:
            assert time.monotonic() < deadline, "the proxy did not follow the hand-over"
            time.sleep(0.05)
        before = httpx.get(f"{proxy.url}/health").json()["memory"]
        for i in range(5):  # not recorded: the user's mode, no control share
            alice.post("/chat/completions", headers={"X-NextState-Record": "off"},
                       json={**ASK, "messages": question(i)}).raise_for_status()
        after = httpx.get(f"{proxy.url}/health").json()["memory"]
    assert after["served"] == before["served"]
    assert after["withheld"] == before["withheld"] + 5
