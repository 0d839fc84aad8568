"""The memory's lessons in the store: learned, merged, credited, dropped, controlled and
forgotten (core/store/lessons.py, retention.py), on SQLite and PostgreSQL."""

import pytest

from nextstate.core.records import TurnRecord
from tests.core.store.verdicts import Verdict


def learn(store, text, user="t:alice", tenant="t", turn_id="s1"):
    return store.lessons.learn(text, tenant=tenant, user=user, turn_id=turn_id,
                               context="Ben has 3 apples")


def test_a_hint_that_says_what_a_lesson_says_joins_it(store):
    first, new = learn(store, "Show me the steps and be casual.")
    again, new_again = learn(store, "show me the steps, and be casual!", turn_id="s2")
    other, _ = learn(store, "Answer in French.", turn_id="s3")
    elsewhere, _ = learn(store, "Show me the steps and be casual.", user="t:bob")
    assert new and not new_again and again == first
    assert len({first, other, elsewhere}) == 3  # other words, or another user's
    lesson = store.lessons.get(first)
    assert lesson["support"] == 2 and lesson["sources"] == ["s1", "s2"]
    assert lesson["context"] == "Ben has 3 apples"


def test_scopes_a_user_a_tenant_and_shared(store):
    mine, _ = learn(store, "one")
    tenants, _ = learn(store, "two", user="t")  # the tenant's own turns: no user named
    shared, _ = learn(store, "three", user=None, tenant=None)
    rows = {r["id"]: (r["tenant"], r["user"]) for r in store.lessons.find(every_tenant=True)}
    assert rows == {mine: ("t", "t:alice"), tenants: ("t", None), shared: (None, None)}
    assert {r["id"] for r in store.lessons.find(tenant="t")} == {mine, tenants}


def test_secrets_are_masked_before_a_lesson_is_stored(store):
    lesson, _ = learn(store, "Mail it to jane@example.com with key sk-abcdefghijklmnopqrstu")
    text = store.lessons.get(lesson)["text"]
    assert "jane@example.com" not in text and "sk-abc" not in text and "[REDACTED]" in text
    assert store.lessons.learn("jane@example.com", tenant=None, user=None,
                               turn_id="x") is not None  # masked, but something is left


def test_served_turns_credit_a_lesson_and_three_corrections_in_a_row_drop_it(store):
    lesson, _ = learn(store, "Be brief.")
    pinned = store.lessons.add("Be kind.", tenant="t", user="t:alice")
    assert store.lessons.record_served([lesson, pinned], "u1", 1, now=1.0) == []
    assert store.lessons.record_served([lesson, pinned], "u1", 1, now=2.0) == []  # again
    for i, at in enumerate((3.0, 4.0)):
        assert store.lessons.record_served([lesson, pinned], f"v{i}", -1, now=at) == []
    assert store.lessons.record_served([lesson, pinned], "v2", -1, now=5.0) == [lesson]
    row = store.lessons.get(lesson)
    assert (row["served"], row["helped"], row["failed"]) == (4, 1, 3)
    assert row["status"] == "dropped" and "corrected" in row["status_reason"]
    assert row["last_useful_at"] == 2.0
    assert store.lessons.get(pinned)["status"] == "active"  # pinned: never dropped
    assert store.lessons.events()[0]["id"] == lesson


def test_a_retired_lesson_taught_again_serves_again(store):
    lesson, _ = learn(store, "Show the steps.")
    assert store.lessons.set_status(lesson, "retired", "learned")
    assert lesson not in {r["id"] for r in store.lessons.servable()}
    learn(store, "Show the steps.", turn_id="s9")
    assert store.lessons.get(lesson)["status"] == "active"
    assert lesson in {r["id"] for r in store.lessons.servable()}


def test_edit_pin_and_forget_change_what_is_served_and_its_version(store):
    lesson, _ = learn(store, "Be brief.")
    before = store.lessons.version()
    edited = store.lessons.edit(lesson, text="Be very brief.", pinned=True)
    assert edited["text"] == "Be very brief." and edited["pinned"]
    assert store.lessons.version() != before
    assert not store.lessons.set_status(lesson, "retired")  # pinned: stays served
    with pytest.raises(ValueError):
        store.lessons.edit(lesson, text="  ")
    assert store.lessons.forget(lesson) and store.lessons.get(lesson) is None
    assert store.lessons.edit(lesson, pinned=False) is None


def turn(turn_id, user, tenant="t", session="s"):
    return TurnRecord(turn_id=turn_id, endpoint="chat", created_at=1.0, session_id=session,
                      request={"messages": [{"role": "user", "content": "q"}]},
                      tenant=tenant, user=user)


def test_forgetting_turns_takes_the_lessons_learned_only_from_them(store):
    store.turns.write([turn("a1", "t:alice", session="s1"), turn("a2", "t:alice", session="s2")])
    only_s1, _ = learn(store, "Be brief.", turn_id="a1")
    both, _ = learn(store, "Show the steps.", turn_id="a1")
    learn(store, "Show the steps.", turn_id="a2")
    written = store.lessons.add("Be kind.", tenant="t", user="t:alice")
    forgotten = store.retention.forget(session_id="s1")
    assert forgotten.lessons == 1 and store.lessons.get(only_s1) is None
    assert store.lessons.get(both)["sources"] == ["a2"] and store.lessons.get(written)
    # A user (or tenant) forgotten whole loses every lesson of theirs, written ones too.
    assert store.retention.forget(user="t:alice").lessons == 2
    assert store.lessons.find(every_tenant=True) == []


def test_forgetting_a_tenant_takes_its_users_and_its_own_lessons_not_others(store):
    learn(store, "one")
    store.lessons.add("two", tenant="t")
    kept = store.lessons.add("three", tenant="u", user="u:carol")
    assert store.retention.forget(tenant="t").lessons == 2
    assert [r["id"] for r in store.lessons.find(every_tenant=True)] == [kept]


def test_a_users_held_out_prompts_are_their_own_turns_in_their_own_tenant(store):
    """The prompts a lesson is checked on: never another tenant's, whatever its users are
    called; a tenant's lessons take any of its users' turns; shared ones take any."""
    served = {"ids": ["l1"], "arm": "lessons"}
    rows = [turn("mine", "alice"), turn("same-name", "alice", tenant="u"),
            turn("colleague", "bob"), turn("unmatched", "alice")]
    for row in rows[:3]:
        row.lessons = served
    store.turns.write(rows)
    ids = {name: {r["id"] for r in store.lessons.held_out(tenant, user, limit=10)}
           for name, (tenant, user) in {"user": ("t", "alice"), "tenant": ("t", None),
                                        "shared": (None, None)}.items()}
    assert ids == {"user": {"mine"}, "tenant": {"mine", "colleague"},
                   "shared": {"mine", "same-name", "colleague"}}


def test_lessons_to_check_go_least_recently_checked_first_served_or_not(store):
    old, _ = learn(store, "Be brief.", turn_id="s1")
    served, _ = learn(store, "Show the steps.", turn_id="s2")
    reserve, _ = learn(store, "Answer in French.", turn_id="s3")  # never served
    recent, _ = learn(store, "Cheer me on.", turn_id="s4")
    pinned = store.lessons.add("Be kind.", tenant="t", user="t:alice")
    store.lessons.record_served([served, pinned], "u1", 1, now=5.0)
    store.lessons.note_check(old, {"adapter": "p@000001", "kl": 0.3, "at": 10.0})
    store.lessons.note_check(recent, {"adapter": "p@000002", "kl": 0.2, "at": 20.0})
    # Never checked first (the served one before the reserve), then the oldest check;
    # pinned ones are never retired, so never checked.
    assert [r["id"] for r in store.lessons.to_check(10)] == [served, reserve, old, recent]
    assert [r["id"] for r in store.lessons.to_check(2, offset=2)] == [old, recent]
    store.lessons.set_status(old, "retired", "learned")
    assert old not in {r["id"] for r in store.lessons.to_check(10)}


def test_held_out_prompts_leave_out_requests_that_answer_a_correction(store):
    """Its prompt ends in what the user just asked for: a lesson drawn from such words
    only repeats it there, so it would look learned (or ignored) whatever the model knew."""
    served = {"ids": ["l1"], "arm": "lessons"}
    rows = [turn("corrected", "alice", session="a"), turn("redo", "alice", session="a"),
            turn("approved", "alice", session="b"), turn("next", "alice", session="b")]
    for row in rows:
        row.lessons = served
    for row in rows:  # one by one: each pairs the session's previous turn with itself
        store.turns.write([row])
    assert store.turns.get("corrected")["next_turn_id"] == "redo"
    store.judgments.save("corrected", Verdict(-1, hints=("Show the steps.",)))
    store.judgments.save("approved", Verdict(1))
    ids = {r["id"] for r in store.lessons.held_out("t", "alice", limit=10)}
    assert ids == {"corrected", "approved", "next"}
