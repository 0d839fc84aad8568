"""Retiring lessons the adapter has learned: measured on held-out prompts, against a
vLLM-shaped fake whose adapter is `gap` nats/token less sure of its own replies when
shown the lesson."""

import httpx
import orjson
import pytest

from nextstate.core.hints import HINT_MARKER
from nextstate.core.records import TurnRecord
from nextstate.core.store import Store
from nextstate.core.vllm import VLLMClient
from nextstate.learner.config import MemoryConfig
from nextstate.learner.retirement import Retirement

LESSON = "Show the steps."


class FakeAdapter:
    """``gap``: how much less sure of its own replies the adapters are when told;
    ``base_gap``: the base model."""

    def __init__(self, gap: float, base_gap: float = 0.5) -> None:
        self.gap = gap
        self.base_gap = base_gap
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        self.calls.append((request.url.path, body))
        if request.url.path == "/tokenize":
            told = HINT_MARKER in body["messages"][-1]["content"]
            return httpx.Response(200, json={"tokens": [1, 2, 3] + ([99] if told else [])})
        if "prompt_logprobs" not in body:  # sampling the adapter's own replies
            return httpx.Response(200, json={"choices": [
                {"index": i, "text": "x", "token_ids": [8, 9]} for i in range(body["n"])]})
        told = 99 in body["prompt"]
        gap = self.base_gap if body["model"] == "base" else self.gap
        return httpx.Response(200, json={"choices": [{"prompt_logprobs": [None] + [
            {str(t): {"logprob": -1.0 - (gap if told else 0.0)}}
            for t in body["prompt"][1:]]}]})

    def sampled_with(self) -> set[str]:
        return {b["model"] for p, b in self.calls if p == "/v1/completions" and "n" in b}


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 's.db'}")
    served = {"ids": ["any"], "hint": LESSON, "message": 0, "part": None, "offset": 2,
              "added": 0}
    s.turns.write([TurnRecord(turn_id=f"q{i}", endpoint="chat", created_at=float(i),
                              session_id=f"s{i}", user="alice", lessons=served,
                              request={"messages": [{"role": "user", "content": f"q{i}"}]})
                   for i in range(3)] + [
        TurnRecord(turn_id="plain", endpoint="chat", created_at=9.0, session_id="p",
                   user="alice", request={"messages": [{"role": "user", "content": "p"}]})])
    yield s
    s.close()


def served_lesson(store):
    lesson, _ = store.lessons.learn(LESSON, tenant=None, user="alice", turn_id="q0")
    store.lessons.record_served([lesson], "q1", -1)
    return lesson


def publish(store, version, policy="p"):
    store.adapters.stage(version, f"{policy}@{version:06d}", policy, f"/a/{version}", {})
    store.adapters.publish(version, [], policy)


def retirement(store, adapter, **config):
    client = VLLMClient("http://vllm", http=httpx.AsyncClient(
        transport=httpx.MockTransport(adapter)))
    return Retirement(store, client, "p", "base", MemoryConfig(**{"check_prompts": 3,
                                                                  **config}))


async def test_a_lesson_the_adapter_follows_untold_is_retired_with_what_was_measured(store):
    lesson = served_lesson(store)
    publish(store, 1)
    adapter = FakeAdapter(gap=0.01)
    retired = await retirement(store, adapter, retire_kl=0.05).check()
    assert [r["id"] for r in retired] == [lesson]
    row = store.lessons.get(lesson)
    assert row["status"] == "retired" and "p@000001 follows it" in row["status_reason"]
    assert row["checked"]["kl"] == pytest.approx(0.01) and row["checked"]["replies"] == 12
    assert row["checked"]["base_kl"] == pytest.approx(0.5)  # told, the base model changes
    assert adapter.sampled_with() == {"p@000001", "base"}  # each answers, untold
    prompts = {b["messages"][0]["content"].split(HINT_MARKER)[0]
               for p, b in adapter.calls if p == "/tokenize"}
    assert prompts == {"q0", "q1", "q2"}  # served with lessons, untrained: not "p"
    assert lesson not in {r["id"] for r in store.lessons.servable()}


async def test_a_lesson_the_base_model_ignores_too_is_dropped_not_retired(store):
    # Told or not, neither the adapter nor the base model answers differently: the
    # lesson never changed anything, so the weights cannot have learned it.
    lesson = served_lesson(store)
    publish(store, 1)
    adapter = FakeAdapter(gap=0.01, base_gap=0.02)
    check = retirement(store, adapter, retire_kl=0.05)
    assert await check.check() == []
    row = store.lessons.get(lesson)
    assert row["status"] == "dropped" and row["status_reason"].startswith("ignored")
    assert row["checked"]["base_kl"] == pytest.approx(0.02)
    assert (check.retired, check.ignored) == (0, 1)
    assert lesson not in {r["id"] for r in store.lessons.servable()}


async def test_the_base_model_is_asked_only_when_the_adapter_passes(store):
    served_lesson(store)
    publish(store, 1)
    adapter = FakeAdapter(gap=0.4)
    await retirement(store, adapter, retire_kl=0.05).check()
    assert adapter.sampled_with() == {"p@000001"}


async def test_too_few_held_out_prompts_put_the_check_off(store):
    served_lesson(store)
    publish(store, 1)
    adapter = FakeAdapter(gap=0.0)
    check = retirement(store, adapter, check_prompts=4)
    assert await check.check() == []
    assert adapter.calls == []
    assert check.waiting == ["alice: 3 of 4 held-out prompts (requests lessons fit, "
                             "not trained on, not answering a correction)"]


async def test_a_lesson_that_still_changes_the_replies_stays_until_the_next_adapter(store):
    lesson = served_lesson(store)
    publish(store, 1)
    adapter = FakeAdapter(gap=0.4)
    check = retirement(store, adapter, retire_kl=0.05)
    assert await check.check() == []
    row = store.lessons.get(lesson)
    assert row["status"] == "active" and row["checked"]["kl"] == pytest.approx(0.4)
    calls = len(adapter.calls)
    assert await check.check() == [] and len(adapter.calls) == calls  # same adapter: done
    publish(store, 2)
    adapter.gap = 0.0
    assert [r["id"] for r in await check.check()] == [lesson]


async def test_nothing_is_retired_into_the_base_model_nor_a_pinned_lesson(store):
    lesson = served_lesson(store)
    adapter = FakeAdapter(gap=0.0)
    assert await retirement(store, adapter).check() == []  # no adapter yet
    assert adapter.calls == []
    store.lessons.edit(lesson, pinned=True)
    publish(store, 1)
    assert await retirement(store, adapter).check() == []
    assert store.lessons.get(lesson)["status"] == "active"


async def test_the_learner_reports_retired_and_dropped_lessons_in_its_status(tmp_path):
    from nextstate.learner.process import Learner, LearnerConfig

    url = f"sqlite:///{tmp_path / 's.db'}"
    store = Store(url)
    retired, _ = store.lessons.learn(LESSON, tenant=None, user="alice", turn_id="x")
    dropped, _ = store.lessons.learn("Answer in French.", tenant=None, user="alice",
                                     turn_id="y")
    store.lessons.set_status(retired, "retired", "p@000001 follows it")
    for turn in ("a", "b", "c"):
        store.lessons.record_served([dropped], turn, -1)
    learner = Learner(LearnerConfig(store_url=url, backends=("http://vllm",),
                                    base_model="p"))
    try:
        memory = learner.status()["memory"]
    finally:
        await learner.close()
        store.close()
    assert memory["counts"] == {"active": 0, "retired": 1, "dropped": 1, "pinned": 0}
    assert [e["id"] for e in memory["retired"]] == [retired]
    assert [e["id"] for e in memory["dropped"]] == [dropped]
    assert "corrected" in memory["dropped"][0]["status_reason"]
    assert memory["ignored"] == 0  # none dropped for being ignored since it started
    assert memory["waiting"] == []  # no retirement without a model to train


async def test_a_lesson_never_served_is_checked_and_retired_too(store):
    # One lesson a request is served: the others of a scope wait as reserves, and each
    # would be served (at a cost) the moment the one above it retires.
    served = served_lesson(store)
    reserve, _ = store.lessons.learn("Answer in French.", tenant=None, user="alice",
                                     turn_id="q2")
    publish(store, 1)
    retired = await retirement(store, FakeAdapter(gap=0.01)).check()
    assert {r["id"] for r in retired} == {served, reserve}
    assert store.lessons.get(reserve)["checked"]["adapter"] == "p@000001"


async def test_a_round_pages_past_lessons_already_checked_and_scopes_still_waiting(
        store, monkeypatch):
    monkeypatch.setattr("nextstate.learner.retirement.PAGE", 4)
    # bob has no held-out prompts yet and three lessons never checked; alice's lessons
    # were checked against the adapter now serving her, but one against an older one.
    mine = [store.lessons.learn(f"lesson {i} for alice", tenant=None, user="alice",
                                turn_id="q0")[0] for i in range(6)]
    assert len(set(mine)) == 6
    for i, lesson in enumerate(mine[:5]):
        store.lessons.note_check(lesson, {"adapter": "p@000001", "kl": 0.3, "at": 1.0 + i})
    store.lessons.note_check(mine[5], {"adapter": "p@000000", "kl": 0.3, "at": 9.0})
    for i in range(3):
        store.lessons.learn(f"lesson {i} for bob", tenant=None, user="bob", turn_id="x")
    publish(store, 1)
    check = retirement(store, FakeAdapter(gap=0.01), checks_per_round=1)
    assert [r["id"] for r in await check.check()] == [mine[5]]
    assert check.waiting == ["bob: 0 of 3 held-out prompts (requests lessons fit, not "
                             "trained on, not answering a correction)"]


async def test_rounds_with_nothing_due_read_nothing_until_an_adapter_or_lesson_changes(
        store, monkeypatch):
    lesson = served_lesson(store)
    publish(store, 1)
    check = retirement(store, FakeAdapter(gap=0.4))
    reads = []
    to_check = store.lessons.to_check
    monkeypatch.setattr(store.lessons, "to_check",
                        lambda *a: reads.append(a) or to_check(*a))
    assert await check.check() == []  # checked: kept
    assert await check.check() == [] and len(reads) == 2  # nothing due now
    assert await check.check() == [] and len(reads) == 2  # nothing changed: not read
    store.lessons.learn("Answer in French.", tenant=None, user="alice", turn_id="q2")
    assert await check.check() == [] and len(reads) == 3  # a new lesson: read, checked
    publish(store, 2)
    assert await check.check() == [] and len(reads) == 4  # a new adapter: both checked
    assert store.lessons.get(lesson)["checked"]["adapter"] == "p@000002"
