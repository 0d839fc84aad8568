"""The hand-over's bookkeeping: each asker's mode, and the judged turns of each arm."""

from dataclasses import dataclass

from nextstate.core.records import TurnRecord
from nextstate.core.store.handover import LESSONS, WEIGHTS, arm_of, memory_version


@dataclass(frozen=True)
class Verdict:
    score: int
    source: str = "judge"
    votes: tuple = ()
    texts: tuple = ()
    hints: tuple = ()
    judge: str = "rules"
    prompt_version: str = "1"


def served(store, turn_id, arm, score, *, user="t:alice", tenant="t", at=1.0,
           source="judge"):
    """A recorded turn that lessons fit, in ``arm`` (None: only pinned ones), judged."""
    lessons = {"ids": ["l1"] if arm != WEIGHTS else [], "withheld": ["l1"]
               if arm == WEIGHTS else [], **({"arm": arm} if arm else {})}
    store.turns.write([TurnRecord(
        turn_id=turn_id, endpoint="chat", created_at=at, session_id=turn_id, tenant=tenant,
        user=user, request={"messages": [{"role": "user", "content": "q"}]},
        lessons=lessons)])
    store.judgments.save(turn_id, Verdict(score, source))


def test_a_mode_starts_when_it_changes_and_the_proxys_version_follows_only_changes(store):
    assert store.handover.modes() == {} and store.handover.get("t", "t:alice") is None
    before = memory_version(store.lessons, store.handover)
    assert store.handover.decide("t", "t:alice", WEIGHTS, "why", {}, now=10.0)
    assert store.handover.modes() == {("t", "t:alice"): WEIGHTS}
    assert store.handover.count() == 1 and store.handover.count(LESSONS) == 0
    changed = memory_version(store.lessons, store.handover)
    assert changed != before
    # The same mode again: new figures, the same start, the same version.
    assert not store.handover.decide("t", "t:alice", WEIGHTS, "still", {"n": 1}, now=20.0)
    assert store.handover.get("t", "t:alice")["since"] == 10.0
    assert store.handover.get("t", "t:alice")["reason"] == "still"
    assert memory_version(store.lessons, store.handover) == changed
    assert store.handover.decide("t", "t:alice", LESSONS, "back", {}, now=30.0)
    assert store.handover.get("t", "t:alice")["since"] == 30.0
    assert store.handover.handed_over() == []


def test_a_first_decision_that_keeps_the_lessons_starts_no_new_span(store):
    # The asker was on lessons from the start: the turns before it still count.
    assert not store.handover.decide("t", "t:alice", LESSONS, "kept", {}, now=10.0)
    assert store.handover.get("t", "t:alice")["since"] == 0.0
    assert store.handover.get("t", "t:alice")["reason"] == "kept"


def test_a_tenant_named_as_its_own_user_is_the_tenants_scope(store):
    store.handover.decide("t", "t", WEIGHTS, "why", {})
    assert store.handover.modes() == {("t", None): WEIGHTS}


def test_the_arms_are_the_askers_judged_turns_since_a_time_newest_first(store):
    served(store, "a1", LESSONS, 1, at=1.0)
    served(store, "a2", WEIGHTS, -1, at=2.0)
    served(store, "a3", LESSONS, -1, at=3.0)
    served(store, "a4", None, 1, at=4.0)  # only pinned lessons fit: no arm
    served(store, "a5", WEIGHTS, 1, at=5.0, source="none")  # no verdict
    served(store, "b1", WEIGHTS, 1, user="t:bob", at=6.0)
    assert store.handover.arms("t", "t:alice", 0.0, 10) == {LESSONS: [-1, 1], WEIGHTS: [-1]}
    assert store.handover.arms("t", "t:alice", 2.5, 10) == {LESSONS: [-1], WEIGHTS: []}
    # One span for both: back to where each arm has one turn (a1 is older than that).
    assert store.handover.arms("t", "t:alice", 0.0, 1) == {LESSONS: [-1], WEIGHTS: [-1]}
    served(store, "a6", LESSONS, 1, at=7.0)
    assert store.handover.arms("t", "t:alice", 0.0, 1) == {LESSONS: [1, -1], WEIGHTS: [-1]}
    assert set(store.handover.askers(0.0)) == {("t", "t:alice"), ("t", "t:bob")}


def test_forgetting_a_user_forgets_their_mode(store):
    store.handover.decide("t", "t:alice", WEIGHTS, "why", {})
    store.handover.decide("t", "t:bob", WEIGHTS, "why", {})
    store.retention.forget(user="t:alice")
    assert store.handover.modes() == {("t", "t:bob"): WEIGHTS}
    store.retention.forget(tenant="t")
    assert store.handover.modes() == {}


def test_a_record_without_a_known_arm_is_in_none():
    assert arm_of({"ids": ["x"], "arm": LESSONS}) == LESSONS
    assert arm_of({"ids": ["x"]}) is None and arm_of(None) is None
    assert arm_of({"arm": "sideways"}) is None
