"""Learning curves on SQLite and PostgreSQL: one row per published version, with its
step's numbers, the traffic it served and a benchmark's scores."""

from __future__ import annotations

from nextstate.core.lora import AdapterStatus
from nextstate.core.records import TurnRecord
from nextstate.core.store import Store
from tests.core.store.test_funnel import Verdict


def served(turn_id: str, model: str, tenant: str | None = None) -> TurnRecord:
    choice = {"index": 0, "message": {"role": "assistant", "content": "x"},
              "token_ids": [5], "logprobs": {"content": [{"logprob": -1.0}]}}
    return TurnRecord(
        turn_id=turn_id, endpoint="chat", created_at=1.0, session_id=turn_id,
        request={"model": "p", "messages": [{"role": "user", "content": "q"}]},
        session_done=True, tenant=tenant,
        response={"model": model, "choices": [choice], "prompt_token_ids": [1],
                  "usage": {"prompt_tokens": 1, "completion_tokens": 1}})


def test_each_published_version_is_a_point_with_its_step_and_its_traffic(store: Store):
    for version, policy in ((1, "p"), (2, "p~alice"), (3, "p"), (4, "p")):
        store.adapters.stage(version, f"{policy}@{version:06d}", policy, f"/a/{version}",
                             {"loss": 0.5 / version, "kl": 0.01 * version})
    store.adapters.publish(1, [], "p")
    store.adapters.publish(2, [], "p~alice")
    store.adapters.publish(3, [], "p")
    store.adapters.set_status(4, AdapterStatus.FAILED, "not loaded")  # never served
    store.turns.write([served("t1", "p@000001", "a"), served("t2", "p@000001", "b"),
                       served("t3", "p@000003", "a"), served("t0", "p")])
    store.judgments.save("t1", Verdict(1))
    store.judgments.save("t2", Verdict(-1))
    rows = store.curves.versions()
    assert [(r["name"], r["status"]) for r in rows] == [
        ("p@000001", "previous"), ("p~alice@000002", "current"), ("p@000003", "current")]
    assert rows[0]["stats"] == {"loss": 0.5, "kl": 0.01}
    assert rows[0]["served"] == {"turns": 2, "judged": 2, "reward_mean": 0.0}
    assert rows[2]["served"] == {"turns": 1, "judged": 0, "reward_mean": None}
    assert rows[1]["served"]["turns"] == 0
    # A tenant's curve is the reward of its own traffic; a policy's, its own versions.
    mine = store.curves.versions(["p"], tenant="a")
    assert [r["name"] for r in mine] == ["p@000001", "p@000003"]
    assert mine[0]["served"] == {"turns": 1, "judged": 1, "reward_mean": 1.0}
    assert store.curves.served()["p"]["turns"] == 1  # the base model's traffic


def test_benchmark_scores_are_kept_per_version(store: Store):
    store.curves.record_score("p", "p@base", "learning", 0.25, at=1.0)
    store.curves.record_score("p", "p@000001", "learning", 0.5, at=2.0)
    store.curves.record_score("q", "q@000002", "learning", 0.9, at=3.0)
    assert [(s["adapter"], s["score"]) for s in store.curves.scores(["p"])] == [
        ("p@base", 0.25), ("p@000001", 0.5)]
    assert len(store.curves.scores()) == 3
