"""The store on SQLite and PostgreSQL: sessions, pairing, retention, redaction."""

import itertools

import pytest

from nextstate.core.records import TurnRecord
from nextstate.core.store import Store

_ids = itertools.count()


def chat_turn(messages, reply, *, session_id=None, turn_type="main", done=False, status="ok",
              at=None):
    n = next(_ids)
    return TurnRecord(
        turn_id=f"t{n}", endpoint="chat", created_at=at if at is not None else float(n),
        request={"model": "m", "messages": messages}, session_id=session_id,
        turn_type=turn_type, session_done=done, status=status,
        response={"model": "m", "prompt_token_ids": [1], "choices": [
            {"index": 0, "message": {"role": "assistant", "content": reply},
             "token_ids": [5, 6], "logprobs": {"content": [{"logprob": -1.0},
                                                           {"logprob": -2.0}]},
             "finish_reason": "stop"}]})


def test_a_request_that_extends_a_reply_continues_its_session(store):
    first = [{"role": "user", "content": "2+2?"}]
    t1 = chat_turn(first, "5")
    second = [*first, {"role": "assistant", "content": "5"},
              {"role": "user", "content": "No, try again."}]
    t2 = chat_turn(second, "4")
    store.turns.write([t1, t2])
    rows = {r["turn_id"]: r for r in store.turns.iterate()}
    assert rows[t1.turn_id]["session_id"] == rows[t2.turn_id]["session_id"]
    assert rows[t2.turn_id]["turn_index"] == 1
    assert rows[t1.turn_id]["next_state"] == [{"role": "user", "content": "No, try again."}]
    assert rows[t1.turn_id]["next_state_kind"] == "user"
    assert rows[t1.turn_id]["next_state_status"] == "paired"
    assert rows[t1.turn_id]["next_turn_id"] == t2.turn_id
    assert rows[t2.turn_id]["next_state_status"] == "pending"
    assert rows[t1.turn_id]["completion_token_ids"] == [5, 6]
    assert rows[t1.turn_id]["logprobs"] == [-1.0, -2.0]


def test_unrelated_conversations_get_separate_sessions(store):
    store.turns.write([chat_turn([{"role": "user", "content": "a"}], "x"),
                 chat_turn([{"role": "user", "content": "b"}], "y")])
    assert len({r["session_id"] for r in store.turns.iterate()}) == 2


def test_explicit_session_pairs_with_the_last_main_turn_and_skips_side_turns(store):
    t1 = chat_turn([{"role": "user", "content": "q"}], "r", session_id="s")
    side = chat_turn([{"role": "user", "content": "summarise"}], "sum", session_id="s",
                     turn_type="side")
    t2 = chat_turn([{"role": "user", "content": "thanks"}], "ok", session_id="s", done=True)
    store.turns.write([t1, side, t2])
    rows = {r["turn_id"]: r for r in store.turns.iterate(session_id="s")}
    assert rows[t1.turn_id]["next_state"] == [{"role": "user", "content": "thanks"}]
    assert rows[side.turn_id]["next_state_status"] == "n/a"
    assert rows[t2.turn_id]["next_state_status"] == "none"  # session done: no next state
    assert [rows[t]["turn_index"] for t in (t1.turn_id, side.turn_id, t2.turn_id)] == [0, 1, 2]


def test_replayed_records_are_not_duplicated(store):
    t1 = chat_turn([{"role": "user", "content": "q"}], "r")
    assert store.turns.write([t1]) == 1
    assert store.turns.write([t1]) == 0
    assert store.turns.count() == 1


def test_idle_sessions_end_with_no_next_state(store):
    t1 = chat_turn([{"role": "user", "content": "q"}], "r", at=100.0)
    store.turns.write([t1])
    assert store.retention.expire_idle(idle_seconds=60, now=200.0) == 1
    assert store.turns.get(t1.turn_id)["next_state_status"] == "none"


def test_failed_turn_is_recorded_but_never_awaits_a_next_state(store):
    t1 = chat_turn([{"role": "user", "content": "q"}], "r", status="upstream_error")
    store.turns.write([t1])
    assert store.turns.get(t1.turn_id)["next_state_status"] == "n/a"


def test_completions_turns_pair_by_session_header_with_the_added_text(store):
    def comp(prompt, text):
        n = next(_ids)
        return TurnRecord(turn_id=f"c{n}", endpoint="completions", created_at=float(n),
                          request={"model": "m", "prompt": prompt}, session_id="cs",
                          response={"choices": [{"index": 0, "text": text, "token_ids": [1],
                                                 "prompt_token_ids": [2]}]})

    a = comp("Q: hi\nA:", " hello")
    b = comp("Q: hi\nA: hello\nQ: more\nA:", " sure")
    store.turns.write([a, b])
    assert store.turns.get(a.turn_id)["next_state"] == [{"role": "user",
                                                     "content": "\nQ: more\nA:"}]


def test_a_continuation_waits_for_its_earlier_turn_from_another_process(store):
    first = [{"role": "user", "content": "2+2?"}]
    t1 = chat_turn(first, "5", at=100.0)
    t2 = chat_turn([*first, {"role": "assistant", "content": "5"},
                    {"role": "user", "content": "No."}], "4", at=101.0)
    # t2 reaches the store first (t1 is still in another proxy's queue): it waits.
    assert store.turns.write_or_defer([t2], pairing_wait=2.0, now=101.5) == (0, [t2])
    store.turns.write([t1])
    assert store.turns.write_or_defer([t2], pairing_wait=2.0, now=101.6) == (1, [])
    rows = {r["turn_id"]: r for r in store.turns.iterate()}
    assert rows[t1.turn_id]["next_turn_id"] == t2.turn_id
    assert rows[t1.turn_id]["session_id"] == rows[t2.turn_id]["session_id"]


def test_a_continuation_whose_parent_never_comes_starts_its_own_session(store):
    orphan = chat_turn([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}], "d", at=100.0)
    assert store.turns.write_or_defer([orphan], pairing_wait=2.0, now=103.0) == (1, [])
    assert store.turns.get(orphan.turn_id)["turn_index"] == 0


def test_secrets_are_scrubbed_and_the_turn_loses_its_token_ids(store):
    leaky = chat_turn([{"role": "user", "content": "use key sk-abcdefghijklmnopqrstuvwx"}],
                      "ok, mailing admin@example.com")
    clean = chat_turn([{"role": "user", "content": "hello"}], "hi")
    store.turns.write([leaky, clean])
    row = store.turns.get(leaky.turn_id)
    assert "sk-" not in str(row["request"]) and "@" not in str(row["response"])
    assert row["redacted"] is True
    assert row["untrainable"] == "redacted: its token ids were dropped"
    assert row["completion_token_ids"] is None and row["prompt_token_ids"] is None
    assert store.turns.get(clean.turn_id)["completion_token_ids"] == [5, 6]


def test_forget_removes_a_session_and_everything_derived(store):
    from nextstate.core.records import FeedbackRecord

    t1 = chat_turn([{"role": "user", "content": "q"}], "r", session_id="gone")
    keep = chat_turn([{"role": "user", "content": "q2"}], "r2", session_id="kept")
    store.turns.write([t1, keep, FeedbackRecord(feedback_id="f", created_at=1.0, score=1,
                                          source="endpoint", turn_id=t1.turn_id)])
    assert store.retention.forget(session_id="gone").turns == 1
    assert [t["session_id"] for t in store.turns.iterate()] == ["kept"]
    assert store.turns.owner(session_id="gone") == (False, None)
    with store.db.engine.connect() as conn:
        from sqlalchemy import func, select

        from nextstate.core.store.schema import feedback, turn_keys
        assert conn.execute(select(func.count()).select_from(feedback)).scalar() == 0
        assert conn.execute(select(func.count()).select_from(turn_keys)).scalar() == 1


def test_forget_by_age_and_by_tenant(store):
    old = chat_turn([{"role": "user", "content": "old"}], "r", at=10.0)
    new = chat_turn([{"role": "user", "content": "new"}], "r", at=1000.0)
    mine = chat_turn([{"role": "user", "content": "mine"}], "r", at=1001.0)
    mine.tenant = "alice"
    store.turns.write([old, new, mine])
    assert store.retention.forget(older_than=500.0).turns == 1
    assert store.retention.forget(tenant="alice").turns == 1
    assert [t["turn_id"] for t in store.turns.iterate()] == [new.turn_id]


def test_a_store_made_before_the_user_column_gets_it_when_opened(store_url):
    from sqlalchemy import inspect, text

    old = Store(store_url)
    before = chat_turn([{"role": "user", "content": "old"}], "r")
    old.turns.write([before])
    with old.db.engine.begin() as conn:  # as an older nextstate created it
        conn.execute(text('ALTER TABLE turns DROP COLUMN "user"'))
        conn.execute(text("DROP INDEX ix_turns_untrainable"))
    old.close()
    reopened = Store(store_url)
    after = chat_turn([{"role": "user", "content": "new"}], "r")
    after.user = "alice"
    reopened.turns.write([after])
    rows = {t["turn_id"]: t["user"] for t in reopened.turns.iterate()}
    indexes = {i["name"] for i in inspect(reopened.db.engine).get_indexes("turns")}
    reopened.close()
    assert rows == {before.turn_id: None, after.turn_id: "alice"}
    assert "ix_turns_untrainable" in indexes  # and the indexes it lacked


def test_current_adapters_of_a_policy_and_its_users_in_one_query(store):
    from nextstate.core.store.schema import adapters

    rows = [(1, "p@000001", "p", "previous"), (2, "p@000002", "p", "current"),
            (3, "p~alice@000003", "p~alice", "current"), (4, "p~bob@000004", "p~bob", "failed"),
            (5, "p_x~carol@000005", "p_x~carol", "current"),
            (6, "pyx~dave@000006", "pyx~dave", "current"), (7, "q@000007", "q", "current")]
    store.db.ensure_schema()
    with store.db.engine.begin() as conn:
        conn.execute(adapters.insert(), [
            {"version": v, "name": n, "policy": p, "status": s, "path": f"/a/{n}",
             "created_at": 0.0} for v, n, p, s in rows])
    assert store.adapters.currents("p") == {"p": ("p@000002", "/a/p@000002"),
                                           "p~alice": ("p~alice@000003", "/a/p~alice@000003")}
    assert store.adapters.currents("p_x") == {  # `_` is no wildcard
        "p_x~carol": ("p_x~carol@000005", "/a/p_x~carol@000005")}
    assert store.adapters.currents("nobody") == {}


def add_adapters(store, rows):
    from nextstate.core.store.schema import adapters

    store.db.ensure_schema()
    with store.db.engine.begin() as conn:
        conn.execute(adapters.insert(), [
            {"version": v, "name": f"{p}@{v:06d}", "policy": p, "status": s,
             "path": f"/a/{p}@{v:06d}", "created_at": 0.0} for v, p, s in rows])


def user_turn(user, tenant=None, session_id=None):
    rec = chat_turn([{"role": "user", "content": f"q{next(_ids)}"}], "r", session_id=session_id)
    rec.user, rec.tenant = user, tenant
    return rec


def test_forgetting_a_user_takes_their_personal_adapters_and_no_one_elses(store):
    from nextstate.core.lora import personal_policy

    odd = "alice smith/../x"  # an id unfit for a file name: its adapter is named by a hash
    store.turns.write([user_turn("alice"), user_turn("alice"), user_turn(odd), user_turn("bob")])
    mine, theirs = personal_policy("p", odd), "p~bob"
    add_adapters(store, [(1, "p", "current"), (2, "p~alice", "unloaded"),
                         (3, "p~alice", "current"), (4, mine, "current"), (5, theirs, "current"),
                         (6, "q~alice", "previous")])

    forgotten = store.retention.forget(user="alice")
    assert forgotten.turns == 2
    assert sorted(a["name"] for a in forgotten.adapters) == [
        "p~alice@000002", "p~alice@000003", "q~alice@000006"]
    assert {a["status"] for a in forgotten.adapters} == {"forgotten"}
    assert set(store.adapters.currents("p")) == {"p", mine, theirs}  # no longer routed
    with pytest.raises(LookupError):
        store.adapters.rollback(3)  # and never served again
    assert [a["name"] for a in store.retention.forget(user=odd).adapters] == [f"{mine}@000004"]
    assert store.retention.forget(user="alice").adapters == []  # already forgotten
    assert {a["version"]: a["status"] for a in store.adapters.versions()} == {
        1: "current", 2: "forgotten", 3: "forgotten", 4: "forgotten", 5: "current",
        6: "forgotten"}


def test_forgetting_a_tenant_takes_its_users_adapters_but_a_session_or_an_age_does_not(store):
    from nextstate.core.lora import personal_policy
    from nextstate.core.records import FeedbackRecord

    odd = "team-a:" + "x" * 80  # hashed in its adapter's name
    store.turns.write([user_turn("team-a", "team-a", "a1"), user_turn("team-a:bob", "team-a", "a2"),
                 user_turn(odd, "team-a", "a3"), user_turn("team-b:dan", "team-b", "b1"),
                 FeedbackRecord(feedback_id="f", created_at=1.0, score=1, source="endpoint",
                                turn_id=None, session_id="a2", tenant="team-a")])
    add_adapters(store, [(1, "p~team-a", "current"), (2, "p~team-a:bob", "current"),
                         (3, personal_policy("p", odd), "current"),
                         (4, "p~team-a:carol", "previous"),  # her turns are gone already
                         (5, "p~team-ab:eve", "current"), (6, "p~team-b:dan", "current")])
    # A session deleted by its own client, turns past an age: the adapters stay.
    assert store.retention.forget(session_id="a1", tenant="team-a").adapters == []
    assert store.retention.forget(older_than=0.5).adapters == []
    with store.db.engine.connect() as conn:  # and the tenant's other feedback stays too
        from sqlalchemy import func, select

        from nextstate.core.store.schema import feedback
        assert conn.execute(select(func.count()).select_from(feedback)).scalar() == 1

    forgotten = store.retention.forget(tenant="team-a")
    assert forgotten.turns == 2
    assert sorted(a["version"] for a in forgotten.adapters) == [1, 2, 3, 4]
    assert set(store.adapters.currents("p")) == {"p~team-ab:eve", "p~team-b:dan"}
