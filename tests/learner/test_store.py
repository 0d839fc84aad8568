"""The learner's bookkeeping in the store, on SQLite and PostgreSQL."""

from nextstate.core.records import TurnRecord
from nextstate.core.store import Store
from nextstate.learner.judgment import Judgment


def turn(i: int) -> TurnRecord:
    return TurnRecord(turn_id=f"t{i}", endpoint="chat", created_at=float(i),
                      session_id=f"s{i}", session_done=True,
                      request={"messages": [{"role": "user", "content": str(i)}]},
                      response={"choices": [{"index": 0, "token_ids": [1, 2],
                                             "logprobs": {"content": [{"logprob": -1.0}] * 2},
                                             "message": {"role": "assistant", "content": "x"}}],
                                "prompt_token_ids": [5],
                                "usage": {"prompt_tokens": 1, "completion_tokens": 2}})


def test_ready_turns_follow_the_method_and_publish_marks_them_once(store_url):
    store = Store(store_url)
    store.turns.write([turn(i) for i in range(3)])
    store.judgments.save("t0", Judgment(score=-1), teacher_logprobs=[[-0.5, -0.5]])
    store.judgments.save("t1", Judgment(score=1))
    store.judgments.save("t2", Judgment(score=0))
    assert [r["id"] for r in store.judgments.ready_for_training("binary", 10)] == ["t0", "t1"]
    assert [r["id"] for r in store.judgments.ready_for_training("opd", 10)] == ["t0", "t1"]
    assert [r["id"] for r in store.judgments.ready_for_training("combined", 10)] == ["t0", "t1"]
    assert store.judgments.ready_count("combined") == 2

    store.adapters.stage(1, "p@000001", "p", "/a/1", {"turns": 2})
    store.adapters.publish(1, ["t0", "t1"], "p")
    assert store.judgments.ready_count("combined") == 0 and store.judgments.trained_count() == 2
    assert store.adapters.current("p")["name"] == "p@000001"
    assert store.adapters.next_version() == 2

    store.adapters.stage(2, "q@000002", "q", "/a/2", {})
    store.adapters.publish(2, [], "q")  # another policy's publish leaves p's current alone
    assert store.adapters.current("p")["version"] == 1
    store.adapters.stage(3, "p@000003", "p", "/a/3", {})
    store.adapters.publish(3, [], "p")
    store.adapters.rollback(1)
    assert store.adapters.current("p")["version"] == 1
    assert {a["version"]: a["status"] for a in store.adapters.versions("p")} == {1: "current",
                                                                       3: "previous"}
    store.close()


def test_skipped_turns_are_never_ready_again(store_url):
    store = Store(store_url)
    store.turns.write([turn(0)])
    store.judgments.save("t0", Judgment(score=-1))
    store.judgments.skip(["t0"], "stale")
    assert store.judgments.ready_count("binary") == 0
    assert store.judgments.get("t0")["trained_version"] == -1
    store.close()


def test_turns_whose_tokens_are_not_exact_are_kept_but_never_ready(store_url):
    store = Store(store_url)
    partial = turn(1)
    assert partial.response is not None
    partial.response["prompt_token_ids"] = None  # e.g. a client library dropped them
    store.turns.write([turn(0), partial])
    for turn_id in ("t0", "t1"):
        store.judgments.save(turn_id, Judgment(score=-1))
    assert [r["id"] for r in store.judgments.ready_for_training("binary", 10)] == ["t0"]
    kept = store.turns.get("t1")
    assert kept is not None and kept["untrainable"] == "no prompt token ids"
    store.close()


def test_steps_of_an_episode_take_its_outcome_and_are_normalised(store_url):
    from nextstate.core.records import FeedbackRecord
    from nextstate.learner.items import normalise_steps, to_item

    store = Store(store_url)
    steps = [turn(i) for i in range(3)]
    for t in steps:
        t.session_id, t.session_done = "episode", False
    store.turns.write(steps)
    store.turns.write([FeedbackRecord(feedback_id="verdict", created_at=9.0, score=1,
                                      source="endpoint", session_id="episode")])
    for t, votes in zip(steps, [(1, 1, 1), (-1, -1, 1), (0, 0, 0)], strict=True):
        store.judgments.save(t.turn_id, Judgment(score=0, votes=votes))
    rows = store.judgments.ready_for_training("binary", 10)  # the outcome makes them trainable
    items = [to_item(r) for r in rows]
    assert [round(i.reward, 3) for i in items] == [2.0, round(1 - 1 / 3, 3), 1.0]
    normalise_steps(items)
    rewards = [i.reward for i in items]
    assert abs(sum(rewards)) < 1e-6 and rewards[0] > rewards[2] > rewards[1]
    store.close()


def test_a_user_with_enough_judged_turns_trains_apart_from_the_shared_lane(store_url):
    store = Store(store_url)
    turns = [turn(i) for i in range(7)]
    for t, user in zip(turns, ["alice"] * 3 + ["bob"] * 2 + [None] * 2, strict=True):
        t.user = user
    store.turns.write(turns)
    for t in turns:
        store.judgments.save(t.turn_id, Judgment(score=-1))
    store.judgments.save("t4", Judgment(score=0))  # no signal: bob has one turn that counts
    assert store.judgments.personal_users("binary", 2) == ["alice"]
    assert store.judgments.personal_users("binary", 1) == ["alice", "bob"]
    assert store.judgments.ready_by_user("binary") == {"alice": 3, "bob": 1, None: 2}
    mine = store.judgments.ready_for_training("binary", 10, user="alice")
    assert [r["id"] for r in mine] == ["t0", "t1", "t2"]
    shared = store.judgments.ready_for_training("binary", 10, personal_after=2)
    assert [r["id"] for r in shared] == ["t3", "t5", "t6"]  # bob's and nobody's
    store.adapters.stage(1, "p~alice@000001", "p~alice", "/a/1", {})
    store.adapters.publish(1, ["t0", "t1", "t2"], "p~alice")
    assert store.judgments.personal_users("binary", 2) == ["alice"]  # trained turns still count
    assert store.judgments.ready_for_training("binary", 10, user="alice") == []
    store.close()


def test_an_adapter_whose_turns_were_forgotten_while_it_trained_never_serves(store_url):
    import pytest

    from nextstate.core.store import TurnsForgotten

    store = Store(store_url)
    turns = [turn(i) for i in range(4)]
    for t in turns:
        t.user = "alice"
    store.turns.write(turns)
    for t in turns:
        store.judgments.save(t.turn_id, Judgment(score=-1))
    store.adapters.stage(1, "p~alice@000001", "p~alice", "/a/1", {})
    store.retention.forget(session_id="s1")  # one of the step's turns, while it trained
    with pytest.raises(TurnsForgotten):
        store.adapters.publish(1, ["t0", "t1"], "p~alice")
    # The user forgotten after their adapter was staged: it has no turns left to mark,
    # and is never made current either.
    store.adapters.stage(2, "p~alice@000002", "p~alice", "/a/2", {})
    store.retention.forget(user="alice")
    with pytest.raises(TurnsForgotten):
        store.adapters.publish(2, [], "p~alice")
    assert store.adapters.current("p~alice") is None
    assert {a["version"]: a["status"] for a in store.adapters.versions()} == {1: "forgotten",
                                                                     2: "forgotten"}
    assert store.judgments.get("t0") is None
    store.judgments.save("t0", Judgment(score=-1, hints=("Say it in French.",)))
    assert store.judgments.get("t0") is None  # judged while it was forgotten: nothing stays
    store.close()
