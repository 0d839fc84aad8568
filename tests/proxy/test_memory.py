"""The memory on the request path: lessons from the store added to the prompts they fit,
recorded, never in the way (against the vLLM-shaped fake)."""

import time

import orjson
import pytest

from nextstate.core.hints import HINT_MARKER
from nextstate.core.store import Store
from nextstate.core.store.handover import memory_version
from nextstate.proxy.settings import MemorySettings
from tests.conftest import RETRIEVAL_ROOM_MS
from tests.proxy.fake_vllm import FakeVLLM
from tests.proxy.test_app import (
    direct,
    open_client,
    publish_adapter,
    records,
    wait_for_router,
)

# Every matched request gets its lessons here (the control share: its own tests below).
ON = MemorySettings(enabled=True, refresh_seconds=0.05, lessons=3, control=0.0,
                    budget_ms=RETRIEVAL_ROOM_MS)
ASK = "Ben has 3 apples and buys 2 more. How many apples does Ben have now?"
LESSON = "Show the steps and talk to me like a friend."
KEYS = (("team-a", "ka"), ("team-b", "kb"))


def chat(content=ASK, **more):
    return {"model": "toy", "messages": [{"role": "system", "content": "Be kind."},
                                         {"role": "user", "content": content}], **more}


def seed(tmp_path, text=LESSON, *, tenant=None, user=None, context=ASK):
    store = Store(f"sqlite:///{tmp_path}/s.db")
    lesson_id, _ = store.lessons.learn(text, tenant=tenant, user=user, turn_id="t0",
                                       context=context)
    store.close()
    return lesson_id


def refreshed(client):
    memory = client.app_state["deps"].memory
    client.portal.call(memory.refresh, True)
    return memory


@pytest.fixture
def fake():
    return FakeVLLM()


def test_a_fitting_lesson_is_appended_to_the_last_user_message_after_the_hint_marker(
        tmp_path, fake):
    lesson = seed(tmp_path)
    with open_client(tmp_path, fake, memory=ON) as client:
        refreshed(client)
        client.post("/v1/chat/completions", json=chat())
        [row] = records(client)
    sent = fake.requests[0]["messages"]
    assert sent[0] == {"role": "system", "content": "Be kind."}
    assert sent[1]["content"] == ASK + HINT_MARKER + LESSON
    assert row["request"] == chat()  # the client's own request
    # No arm: the base model serves it, so there are no weights to hand over to.
    assert row["lessons"] == {"ids": [lesson], "hint": LESSON, "message": 1, "part": None,
                              "offset": len(ASK), "added": 0}


def test_the_client_gets_the_same_answer_with_lessons_in_the_prompt(tmp_path, fake):
    seed(tmp_path)
    with open_client(tmp_path, fake, memory=ON) as client:
        refreshed(client)
        whole = client.post("/v1/chat/completions", json=chat())
        with client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as answer:
            streamed = b"".join(answer.iter_bytes())
    assert orjson.loads(whole.content) == orjson.loads(direct(fake, chat()))
    assert streamed == direct(fake, chat(stream=True))
    assert all(HINT_MARKER in r["messages"][1]["content"] for r in fake.requests)


def test_a_request_matching_no_lesson_goes_out_as_sent(tmp_path, fake):
    seed(tmp_path)
    with open_client(tmp_path, fake, memory=ON) as client:
        memory = refreshed(client)
        client.post("/v1/chat/completions", json=chat("Translate 'chien' into English."))
        [row] = records(client)
    assert HINT_MARKER not in fake.requests[0]["messages"][1]["content"]
    assert row["lessons"] is None
    assert memory.counts.unmatched == 1


def test_lessons_stay_within_their_user_and_tenant(tmp_path, fake):
    seed(tmp_path, tenant="team-a", user="team-a:alice")
    with open_client(tmp_path, fake, memory=ON, client_keys=KEYS) as client:
        refreshed(client)
        for key, user in (("ka", "alice"), ("ka", "bob"), ("kb", "alice")):
            client.post("/v1/chat/completions", json=chat(), headers={
                "Authorization": f"Bearer {key}", "X-NextState-User": user})
    got = [HINT_MARKER in r["messages"][1]["content"] for r in fake.requests]
    assert got == [True, False, False]  # alice of team-a only, not team-b's alice


def test_a_tenants_own_lessons_reach_its_users_and_shared_ones_everyone(tmp_path, fake):
    seed(tmp_path, "Tenant lesson about apples.", tenant="team-a", user="team-a")
    seed(tmp_path, "Shared lesson about apples.")
    with open_client(tmp_path, fake, memory=ON, client_keys=KEYS) as client:
        refreshed(client)
        for key in ("ka", "kb"):
            client.post("/v1/chat/completions", json=chat(), headers={
                "Authorization": f"Bearer {key}", "X-NextState-User": "carol"})
    a, b = (r["messages"][1]["content"] for r in fake.requests)
    assert "Tenant lesson" in a and "Shared lesson" in a
    assert "Tenant lesson" not in b and "Shared lesson" in b


def test_memory_off_for_a_request_or_a_proxy_leaves_the_prompt_alone(tmp_path, fake):
    seed(tmp_path)
    with open_client(tmp_path, fake, memory=ON) as client:
        refreshed(client)
        client.post("/v1/chat/completions", json=chat(),
                    headers={"X-NextState-Memory": "off"})
    with open_client(tmp_path, fake) as client:  # off by default
        client.post("/v1/chat/completions", json=chat())
        assert client.get("/health").json()["memory"] is None
    assert all(HINT_MARKER not in r["messages"][1]["content"] for r in fake.requests)
    assert "x-nextstate-memory" not in fake.headers[0]


def test_only_the_named_users_get_lessons(tmp_path, fake):
    seed(tmp_path, user="alice")
    seed(tmp_path, user="bob")
    only = MemorySettings(enabled=True, only=("alice",), control=0.0, budget_ms=RETRIEVAL_ROOM_MS)
    with open_client(tmp_path, fake, memory=only) as client:
        refreshed(client)
        for user in ("alice", "bob"):
            client.post("/v1/chat/completions", json=chat(),
                        headers={"X-NextState-User": user})
    assert [HINT_MARKER in r["messages"][1]["content"] for r in fake.requests] == [True, False]


def test_with_a_policy_only_requests_for_it_get_lessons(tmp_path, fake):
    seed(tmp_path)
    with open_client(tmp_path, fake, memory=ON, policy="toy") as client:
        refreshed(client)
        client.post("/v1/chat/completions", json=chat())
        client.post("/v1/chat/completions", json={**chat(), "model": "other"})
    assert [HINT_MARKER in r["messages"][1]["content"] for r in fake.requests] == [True, False]


def test_a_completions_prompt_gets_its_lessons_at_its_end(tmp_path, fake):
    seed(tmp_path)
    with open_client(tmp_path, fake, memory=ON) as client:
        refreshed(client)
        client.post("/v1/completions", json={"model": "toy", "prompt": ASK})
        [row] = records(client)
    assert fake.requests[0]["prompt"] == ASK + HINT_MARKER + LESSON
    assert row["request"]["prompt"] == ASK
    assert row["lessons"]["message"] == -1 and row["lessons"]["offset"] == len(ASK)


def test_a_retired_lesson_is_no_longer_served_once_the_index_follows(tmp_path, fake):
    lesson = seed(tmp_path)
    with open_client(tmp_path, fake, memory=ON) as client:
        refreshed(client)
        client.post("/v1/chat/completions", json=chat())
        store = client.app_state["deps"].store
        store.lessons.set_status(lesson, "retired", "the weights follow it")
        deadline = time.monotonic() + 5
        while client.get("/health").json()["memory"]["version"] != memory_version(
                store.lessons, store.handover):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client.post("/v1/chat/completions", json=chat())
    assert [HINT_MARKER in r["messages"][1]["content"] for r in fake.requests] == [True, False]


def test_a_costly_or_failing_retrieval_serves_without_lessons_and_is_counted(tmp_path, fake):
    seed(tmp_path)
    # The follower must not rebuild the index behind the test's back (it would replace
    # the None below within a refresh period).
    still = MemorySettings(enabled=True, refresh_seconds=3600, control=0.0)
    with open_client(tmp_path, fake, memory=still) as client:
        memory = refreshed(client)
        real = memory.index

        class Slow:
            def search(self, *args, **kwargs):
                started = time.thread_time()
                while time.thread_time() - started < 0.01:  # 10 ms of CPU: over 2 ms
                    pass
                return real.search(*args, **kwargs)

        class Preempted:  # waits (another process had the core): not retrieval's cost
            def search(self, *args, **kwargs):
                time.sleep(0.05)
                return real.search(*args, **kwargs)

        class Broken:
            def search(self, *args, **kwargs):
                raise RuntimeError("index broke")

        for index in (Slow(), Broken(), Preempted()):
            memory.index = index
            assert client.post("/v1/chat/completions", json=chat()).status_code == 200
        memory.index = None  # the store was away when the proxy started
        assert client.post("/v1/chat/completions", json=chat()).status_code == 200
        counts = client.get("/health").json()["memory"]
    got = [HINT_MARKER in r["messages"][1]["content"] for r in fake.requests]
    assert got == [False, False, True, False]  # slow, broken, preempted, not ready
    assert (counts["slow"], counts["failed"], counts["not_ready"]) == (1, 1, 1)
    assert counts["served"] == 1


def test_lessons_beyond_the_count_or_the_characters_are_left_out(tmp_path, fake):
    for i in range(5):
        seed(tmp_path, f"Lesson {i}: mention the apples {'and more ' * i}in the answer.")
    with open_client(tmp_path, fake, memory=MemorySettings(
            enabled=True, lessons=2, max_chars=200, control=0.0,
            budget_ms=RETRIEVAL_ROOM_MS)) as client:
        refreshed(client)
        client.post("/v1/chat/completions", json=chat())
        [row] = records(client)
    assert len(row["lessons"]["ids"]) == 2
    assert len(row["lessons"]["hint"]) <= 200


def test_by_default_a_request_gets_its_best_lesson_only(tmp_path, fake):
    seed(tmp_path, "Use short words.", context="How many apples are left?")  # fits less
    best = seed(tmp_path, LESSON)  # learned on this very question
    one = MemorySettings(enabled=True, control=0.0, budget_ms=RETRIEVAL_ROOM_MS)  # default count
    with open_client(tmp_path, fake, memory=one) as client:
        refreshed(client)
        client.post("/v1/chat/completions", json=chat())
        [row] = records(client)
    assert row["lessons"]["ids"] == [best]
    content = fake.requests[0]["messages"][1]["content"]
    assert LESSON in content and "short words" not in content


@pytest.mark.parametrize("path, body", [
    ("/v1/messages", {"model": "toy", "max_tokens": 8,
                      "messages": [{"role": "user", "content": ASK}]}),
    ("/v1/responses", {"model": "toy", "input": ASK}),
])
def test_the_dialects_get_their_lessons_in_the_chat_request_the_model_sees(
        tmp_path, fake, path, body):
    lesson = seed(tmp_path)
    with open_client(tmp_path, fake, memory=ON) as client:
        refreshed(client)
        answer = client.post(path, json=body)
        [row] = records(client)
    assert answer.status_code == 200, answer.text
    assert fake.requests[0]["messages"][-1]["content"].endswith(HINT_MARKER + LESSON)
    assert row["lessons"]["ids"] == [lesson]
    assert HINT_MARKER not in str(row["dialect"]["request"])  # the client's own


class Draws:
    """The memory's random draws, in order (the control share: under ``control``)."""

    def __init__(self, *draws):
        self.draws = list(draws)

    def random(self):
        return self.draws.pop(0)


def test_a_control_share_of_recorded_requests_goes_without_its_lessons_and_says_so(
        tmp_path, fake):
    lesson = seed(tmp_path, user="alice")
    control = MemorySettings(enabled=True, refresh_seconds=0.05, control=0.2,
                             budget_ms=RETRIEVAL_ROOM_MS)
    with open_client(tmp_path, fake, memory=control, policy="toy",
                     adapter_poll_seconds=0.02) as client:
        wait_for_router(client, publish_adapter(tmp_path, "toy", 7))
        memory = refreshed(client)
        memory.rng = Draws(0.1, 0.9)  # the first request in the control share
        for _ in range(2):
            client.post("/v1/chat/completions", json=chat(),
                        headers={"X-NextState-User": "alice"})
        # Not recorded, not measured: the asker's mode, and no draw (Draws would raise).
        client.post("/v1/chat/completions", json=chat(),
                    headers={"X-NextState-User": "alice", "X-NextState-Record": "off"})
        first, second = records(client, submitted=2)
        counts = client.get("/health").json()["memory"]
    assert [HINT_MARKER in r["messages"][1]["content"] for r in fake.requests] == [
        False, True, True]
    assert first["lessons"] == {"ids": [], "withheld": [lesson], "arm": "weights"}
    assert second["lessons"]["ids"] == [lesson] and second["lessons"]["arm"] == "lessons"
    assert (counts["control"], counts["withheld"], counts["served"]) == (1, 1, 2)


def test_once_handed_over_only_the_control_share_and_pinned_lessons_are_served(
        tmp_path, fake):
    lesson = seed(tmp_path, user="alice")
    store = Store(f"sqlite:///{tmp_path}/s.db")
    pinned = store.lessons.add("Always say which units.", user="alice")
    store.handover.decide(None, "alice", "weights", "the lessons no longer help", {})
    store.close()
    control = MemorySettings(enabled=True, refresh_seconds=0.05, control=0.2, lessons=3,
                             budget_ms=RETRIEVAL_ROOM_MS)
    with open_client(tmp_path, fake, memory=control, policy="toy",
                     adapter_poll_seconds=0.02) as client:
        memory = refreshed(client)
        assert client.get("/health").json()["memory"]["handed_over"] == 1
        # No adapter yet: the base model serves alice, with her lessons (no weights to
        # hand over to).
        client.post("/v1/chat/completions", json=chat(), headers={"X-NextState-User": "alice"})
        wait_for_router(client, publish_adapter(tmp_path, "toy", 7))
        memory.rng = Draws(0.9, 0.1)  # the second request in the control share
        for user in ("alice", "alice", "bob"):  # bob has no lessons: no draw
            client.post("/v1/chat/completions", json=chat(),
                        headers={"X-NextState-User": user})
        based, first, second, _ = sorted(records(client, submitted=4),
                                         key=lambda r: r["created_at"])
    sent = [r["messages"][1]["content"] for r in fake.requests]
    assert "which units" in sent[0] and LESSON in sent[0] and "arm" not in based["lessons"]
    assert "which units" in sent[1] and LESSON not in sent[1]
    assert "which units" in sent[2] and LESSON in sent[2]
    assert HINT_MARKER not in sent[3]
    assert (first["lessons"]["ids"], first["lessons"]["withheld"]) == ([pinned], [lesson])
    assert first["lessons"]["arm"] == "weights" and second["lessons"]["arm"] == "lessons"
    assert set(second["lessons"]["ids"]) == {pinned, lesson}
