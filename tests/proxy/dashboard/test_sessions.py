"""The dashboard's sessions: the list (searchable, a tenant's own), one session with its
next states and judgments, one turn's tokens with logprobs and the teacher's."""

from __future__ import annotations

import hashlib

import pytest

from bench.gui_session import gui_session
from nextstate.core.sessions import image_urls
from tests.proxy.fake_vllm import LOGPROBS, TOKEN_IDS
from tests.proxy.test_app import ALICE, BOB, ROOT

API = "/v1/dashboard"


def listed(client, headers, **params) -> list[str]:
    answer = client.get(f"{API}/sessions", headers=headers, params=params)
    assert answer.status_code == 200, answer.text
    return [s["id"] for s in answer.json()["sessions"]]


def test_a_tenant_lists_and_finds_only_its_own_sessions(dash):
    client, _ = dash
    assert sorted(listed(client, ROOT)) == ["a-1", "b-1"]
    assert listed(client, ALICE) == ["a-1"]
    assert listed(client, BOB, q="secret PLANS") == ["b-1"]
    assert listed(client, ALICE, q="secret plans") == []
    assert listed(client, ROOT, q="just the number") == ["a-1"]


def test_a_session_shows_each_turns_next_state_judgment_and_numbers(dash):
    client, _ = dash
    page = client.get(f"{API}/sessions/a-1", headers=ALICE).json()
    first, second = page["turns"]
    assert first["next_state"] == [{"role": "user", "content": "No, just the number."}]
    assert first["judgment"]["score"] == -1
    assert first["judgment"]["hints"] == ["Answer with the number."]
    assert first["judgment"]["votes"] == [-1, -1, 0] and first["teacher_hints"] == 1
    assert (first["prompt_tokens"], first["completion_tokens"]) == (4, 3)
    assert "completion_token_ids" not in first and "logprobs" not in first
    assert first["served_model"] == "toy" and first["latency_ms"] >= 0
    assert second["next_state_status"] == "none" and second["judgment"] is None


def test_another_tenants_session_and_turn_are_not_found(dash):
    client, store = dash
    assert client.get(f"{API}/sessions/b-1", headers=ALICE).status_code == 404
    bobs = next(t for t in store.turns.iterate(session_id="b-1"))
    hidden = client.get(f"{API}/turns/{bobs['turn_id']}/tokens", headers=ALICE)
    assert hidden.status_code == 404 and hidden.json()["error"]["type"]
    assert client.get(f"{API}/turns/{bobs['turn_id']}/tokens", headers=ROOT).status_code == 200


def test_a_turns_tokens_come_with_text_logprobs_and_teacher_logprobs(dash):
    client, store = dash
    first = next(t for t in store.turns.iterate(session_id="a-1") if t["turn_index"] == 0)
    answer = client.get(f"{API}/turns/{first['turn_id']}/tokens", headers=ALICE).json()
    assert [t["id"] for t in answer["tokens"]] == TOKEN_IDS
    assert [t["text"] for t in answer["tokens"]] == [f"<{i}>" for i in TOKEN_IDS]
    assert [t["logprob"] for t in answer["tokens"]] == LOGPROBS
    assert [t["teacher"] for t in answer["tokens"]] == [[-0.1], [-0.2], [-0.3]]
    assert answer["hints"] == ["Answer with the number."]


@pytest.mark.parametrize("params", [{"limit": "0"}, {"limit": "x"}, {"offset": "-1"},
                                    {"q": "x" * 201}])
def test_bad_list_parameters_are_a_400(dash, params):
    client, _ = dash
    answer = client.get(f"{API}/sessions", headers=ROOT, params=params)
    assert answer.status_code == 400 and answer.json()["error"]["param"] in params


def test_a_turns_screenshot_is_served_to_its_tenant_and_admin_only(dash):
    """The store keeps each screenshot once, by hash; the session page names it by
    reference and the page fetches it with the key: another tenant gets a 404."""
    client, store = dash
    shots, records = gui_session(2, session_id="gui", tenant="bob")
    store.turns.write(records)
    page = client.get(f"{API}/sessions/gui", headers=BOB).json()
    [ref] = image_urls([page["turns"][0]["request"]["messages"][1]])
    digest = ref.rsplit(":", 1)[1]
    assert digest == hashlib.sha256(shots[0]).hexdigest()
    for headers in (BOB, ROOT):
        answer = client.get(f"{API}/images/{digest}", headers=headers)
        assert answer.status_code == 200 and answer.content == shots[0]
        assert answer.headers["content-type"] == "image/png"
        assert "sandbox" in answer.headers["content-security-policy"]
    for headers, name in ((ALICE, digest), (ROOT, "0" * 64), (ROOT, "../../etc"),
                          (ROOT, digest.upper())):
        missing = client.get(f"{API}/images/{name}", headers=headers)
        assert missing.status_code == 404 and missing.json()["error"]["type"]
    assert client.get(f"{API}/images/{digest}").status_code == 401  # no key, no image
