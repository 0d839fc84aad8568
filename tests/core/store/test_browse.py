"""Browsing sessions on SQLite and PostgreSQL: search, newest first, pages, tenants, and
one session with its judgments and tokens."""

from __future__ import annotations

import pytest

from nextstate.core.records import TurnRecord
from nextstate.core.store import Store
from tests.core.store.test_funnel import Verdict


def ask(turn_id: str, session: str, text: str, at: float, *, tenant: str | None = None,
        history: list | None = None, user: str | None = None) -> TurnRecord:
    choice = {"index": 0, "message": {"role": "assistant", "content": f"reply to {text}"},
              "token_ids": [7, 8], "logprobs": {"content": [{"logprob": -0.5}] * 2}}
    return TurnRecord(
        turn_id=turn_id, endpoint="chat", created_at=at, finished_at=at + 0.1,
        session_id=session, tenant=tenant, user=user,
        request={"model": "p", "messages": [*(history or []),
                                             {"role": "user", "content": text}]},
        response={"model": "p@000001", "choices": [choice], "prompt_token_ids": [1, 2],
                  "usage": {"prompt_tokens": 2, "completion_tokens": 2}})


@pytest.fixture
def store(store_url: str):
    s = Store(store_url)
    first = ask("a1", "sa", "What is the Capital of France?", 10.0, tenant="a", user="a:al")
    follow = [{"role": "user", "content": "What is the Capital of France?"},
              {"role": "assistant", "content": "reply to What is the Capital of France?"}]
    s.turns.write([first, ask("a2", "sa", "No, just the name", 11.0, tenant="a",
                              history=follow),
                   ask("b1", "sb", "Sort this list 50%_off", 20.0, tenant="b"),
                   *(ask(f"c{i}", f"sc{i}", f"filler {i}", 30.0 + i, tenant="a")
                     for i in range(3))])
    s.judgments.save("a1", Verdict(-1, hints=("Name the city only.",)),
                     teacher_logprobs=[[-0.1, -0.2]])
    yield s
    s.close()


def test_sessions_come_newest_first_in_pages(store: Store):
    page = store.browse.sessions(limit=2)
    assert page["total"] == 5
    assert [s["id"] for s in page["sessions"]] == ["sc2", "sc1"]
    rest = store.browse.sessions(limit=10, offset=2)
    assert [s["id"] for s in rest["sessions"]] == ["sc0", "sb", "sa"]
    sa = rest["sessions"][-1]
    assert (sa["turns"], sa["main_turns"], sa["judged"], sa["reward_mean"]) == (2, 2, 1, -1.0)
    assert (sa["user"], sa["tenant"], sa["served_model"]) == ("a:al", "a", "p@000001")
    assert sa["opening"] == "What is the Capital of France?"


def test_search_finds_text_ids_and_users_case_insensitively_and_literally(store: Store):
    def found(query: str, tenant: str | None = None) -> list[str]:
        return [s["id"] for s in store.browse.sessions(query=query, tenant=tenant)["sessions"]]

    assert found("capital of france") == ["sa"]
    assert found("just the NAME") == ["sa"]  # the second turn's text finds the session
    assert found("sb") == ["sb"] and found("a:al") == ["sa"]
    assert found("50%_") == ["sb"] and found("0%x") == []  # % and _ are plain characters
    assert found("reply to sort") == ["sb"]  # replies too
    assert store.browse.sessions(query="capital")["sessions"][0]["turns"] == 2


def test_a_tenant_lists_and_opens_only_its_own_sessions(store: Store):
    assert {s["id"] for s in store.browse.sessions(tenant="b")["sessions"]} == {"sb"}
    assert store.browse.sessions(tenant="b", query="capital")["total"] == 0
    assert store.browse.session("sa", tenant="b") is None
    assert store.browse.tokens("a1", tenant="b") is None
    assert store.browse.session("nope") is None


def test_a_session_has_each_turns_next_state_and_judgment(store: Store):
    turns = store.browse.session("sa", tenant="a")
    assert turns is not None and [t["turn_id"] for t in turns] == ["a1", "a2"]
    first = turns[0]
    assert first["next_state"] == [{"role": "user", "content": "No, just the name"}]
    assert first["judgment"]["score"] == -1
    assert first["judgment"]["hints"] == ["Name the city only."]
    assert "teacher_logprobs" not in first["judgment"] and first["teacher_hints"] == 1
    assert turns[1]["judgment"] is None
    tokens = store.browse.tokens("a1", tenant="a")
    assert tokens is not None
    assert tokens["token_ids"] == [7, 8] and tokens["logprobs"] == [-0.5, -0.5]
    assert tokens["teacher_logprobs"] == [[-0.1, -0.2]]
