"""Handing an asker's lessons over to the weights when the turns served without them
score as well, and back when they no longer do (against a store, SQLite and PostgreSQL)."""

import pytest

from nextstate.core.store import Store
from nextstate.core.store.handover import LESSONS, WEIGHTS
from nextstate.learner.handover import HandOvers
from tests.core.store.test_handover import served


@pytest.fixture
def store(store_url):
    s = Store(store_url)
    yield s
    s.close()


def turns(store, arm, scores, start, user="t:alice"):
    for i, score in enumerate(scores):
        served(store, f"{user}-{arm}-{start + i}", arm, score, user=user, at=start + i)


def test_too_few_turns_in_either_arm_decide_nothing(store):
    turns(store, LESSONS, [-1] * 8, 1)
    turns(store, WEIGHTS, [1] * 7, 20)
    handovers = HandOvers(store.handover, after=8)
    assert handovers.check(now=100.0) == [] and store.handover.modes() == {}


def test_lessons_that_no_longer_help_are_handed_over_and_taken_back_when_they_do(store):
    turns(store, LESSONS, [1, -1] * 6, 1)  # with lessons: 0.0 on average
    turns(store, WEIGHTS, [1, -1, 1, 1, -1, 1, -1, -1], 20)  # without: 0.0 too
    turns(store, LESSONS, [1] * 4, 1, user="t:bob")  # too few to decide on
    handovers = HandOvers(store.handover, after=8)
    [change] = handovers.check(now=100.0)
    assert (change["user"], change["mode"]) == ("t:alice", WEIGHTS)
    # The same span for both arms: back to where the rarer one has 8 turns.
    assert change["with"] == {"turns": 8, "mean": 0.0}
    assert change["without"] == {"turns": 8, "mean": 0.0}
    assert "without lessons scored +0.00" in change["reason"]
    assert store.handover.modes() == {("t", "t:alice"): WEIGHTS}
    assert handovers.check(now=110.0) == []  # nothing new: nothing changes
    # Handed over, only the turns from then on count: the control share served with
    # lessons now does better than the turns without them.
    turns(store, WEIGHTS, [-1] * 8, 120)
    turns(store, LESSONS, [1] * 7, 140)
    assert handovers.check(now=200.0) == []  # 7 with lessons: not yet
    turns(store, LESSONS, [-1], 150)
    [back] = handovers.check(now=300.0)
    assert back["mode"] == LESSONS and back["with"] == {"turns": 8, "mean": 0.75}
    assert store.handover.modes() == {("t", "t:alice"): LESSONS}
    assert [s["mode"] for s in handovers.switches] == [WEIGHTS, LESSONS]


def test_lessons_that_help_stay_served(store):
    turns(store, LESSONS, [1, 1, 1, -1] * 3, 1)
    turns(store, WEIGHTS, [1, -1, -1, -1] * 2, 20)
    handovers = HandOvers(store.handover, after=8)
    assert handovers.check(now=100.0) == []
    assert store.handover.get("t", "t:alice")["mode"] == LESSONS
    assert store.handover.get("t", "t:alice")["figures"]["without"]["mean"] == -0.5


def test_once_handed_over_lessons_come_back_only_by_a_clear_margin(store):
    store.handover.decide("t", "t:alice", WEIGHTS, "earlier", {}, now=100.0)
    turns(store, WEIGHTS, [-1] * 8, 120)
    turns(store, LESSONS, [1, 1] + [-1] * 6, 140)  # -0.5 against -1.0: not by over 0.5
    handovers = HandOvers(store.handover, after=8)
    assert handovers.check(now=200.0) == []
    assert store.handover.get("t", "t:alice")["mode"] == WEIGHTS
    turns(store, LESSONS, [1] * 4, 160)  # 12 turns with lessons since: 0.0 against -1.0
    [back] = handovers.check(now=300.0)
    assert back["mode"] == LESSONS and back["with"] == {"turns": 12, "mean": 0.0}


def test_no_hand_over_while_most_turns_without_lessons_are_corrected(store):
    # A turn is corrected when one thing in it is wrong: where most are, a tie between
    # the arms says nothing of what the lessons do, so they stay.
    turns(store, LESSONS, [1, -1, -1, -1] * 2, 1)  # -0.5 with lessons
    turns(store, WEIGHTS, [1, 1, -1, -1, -1, -1, -1, 1], 20)  # -0.25 without: as well
    handovers = HandOvers(store.handover, after=8)
    assert handovers.check(now=100.0) == []
    row = store.handover.get("t", "t:alice")
    assert row["mode"] == LESSONS and "most turns are corrected" in row["reason"]
    turns(store, WEIGHTS, [1] * 8, 140)  # later, approved without them: handed over
    [change] = handovers.check(now=200.0)
    assert change["mode"] == WEIGHTS and change["without"]["mean"] > 0
