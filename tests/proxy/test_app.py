"""The proxy app end to end against a vLLM-shaped fake (httpx.MockTransport)."""

import time

import httpx
import orjson
import pytest
from starlette.testclient import TestClient

from nextstate.proxy.app import make_app
from nextstate.proxy.settings import ProxySettings
from tests.proxy.fake_vllm import MAX_MODEL_LEN, PROMPT_IDS, TOKEN_IDS, FakeVLLM

CHAT = {"model": "toy", "messages": [{"role": "user", "content": "hi"}]}


def open_client(tmp_path, upstream, **settings):
    app = make_app(ProxySettings(backends=("http://vllm",), store_url=f"sqlite:///{tmp_path}/s.db",
                                 spool_dir=tmp_path / "spool", **settings),
                   transport=httpx.MockTransport(upstream))
    return TestClient(app)


@pytest.fixture
def fake():
    return FakeVLLM()


@pytest.fixture
def client(tmp_path, fake):
    with open_client(tmp_path, fake) as c:
        yield c


def records(client, submitted=1):
    """The store's turns once ``submitted`` records reached the recorder (in the journal
    before the client has its last byte) and were written."""
    deps = client.app_state["deps"]
    deadline = time.monotonic() + 5
    while deps.recorder.stats.submitted < submitted and time.monotonic() < deadline:
        time.sleep(0.005)
    client.portal.call(deps.recorder.flush)
    return list(deps.store.turns.iterate())


def direct(fake, body):
    """What vLLM would answer the client's own (chat) request."""
    if body.get("stream"):
        return FakeVLLM().stream_bytes(body, chat=True)
    return orjson.dumps(FakeVLLM().whole(body, chat=True))


def test_response_is_what_vllm_gives_the_client_directly(client, fake):
    answer = client.post("/v1/chat/completions", json=CHAT)
    assert answer.status_code == 200
    assert orjson.loads(answer.content) == orjson.loads(direct(fake, CHAT))
    assert fake.requests[0]["return_token_ids"] is True
    assert fake.requests[0]["logprobs"] is True


def test_turn_is_recorded_with_token_ids_and_logprobs(client):
    answer = client.post("/v1/chat/completions", json=CHAT)
    [row] = records(client)
    assert answer.headers["x-nextstate-turn-id"] == row["turn_id"]
    assert row["prompt_token_ids"] == PROMPT_IDS
    assert row["completion_token_ids"] == TOKEN_IDS
    assert row["logprobs"] == [-0.5, -0.25, -0.125]
    assert row["response"]["choices"][0]["message"]["content"] == "Hello!"
    assert row["request"] == CHAT  # the client's request, not the upstream one
    assert row["status"] == "ok"


def test_stream_is_relayed_unchanged_and_recorded(client, fake):
    body = {**CHAT, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as answer:
        got = b"".join(answer.iter_bytes())
    assert got == direct(fake, body)  # usage chunk dropped, fingerprint restored
    [row] = records(client)
    assert row["completion_token_ids"] == TOKEN_IDS
    assert row["ttft_ms"] is not None


def test_stream_keeps_what_the_client_asked_for(client, fake):
    body = {**CHAT, "stream": True, "logprobs": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as answer:
        got = b"".join(answer.iter_bytes())
    assert got == direct(fake, body)


def test_session_headers_are_stripped_before_forwarding(client, fake):
    client.post("/v1/chat/completions", json={**CHAT, "session_id": "s1"},
                headers={"X-Turn-Type": "side", "X-Session-Done": "1"})
    assert "session_id" not in fake.requests[0]
    assert "x-turn-type" not in fake.headers[0]
    [row] = records(client)
    assert (row["session_id"], row["turn_type"]) == ("s1", "side")


def test_opt_out_header_forwards_without_recording(client, fake):
    answer = client.post("/v1/chat/completions", json=CHAT,
                         headers={"X-NextState-Record": "off"})
    assert answer.status_code == 200
    assert "return_token_ids" not in fake.requests[0]
    assert "x-nextstate-turn-id" not in answer.headers
    assert records(client, submitted=0) == []


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_bad_body_is_a_400_in_openai_shape(client, body):
    answer = client.post("/v1/chat/completions", content=body,
                         headers={"content-type": "application/json"})
    assert answer.status_code == 400
    assert answer.json()["error"]["type"] == "invalid_request_error"


def test_body_over_the_limit_is_a_413(tmp_path, fake):
    with open_client(tmp_path, fake, max_body_bytes=100) as c:
        answer = c.post("/v1/chat/completions", json={**CHAT, "pad": "x" * 200})
    assert answer.status_code == 413


def test_backend_down_is_a_clear_502_and_is_recorded(tmp_path):
    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)

    with open_client(tmp_path, refuse) as c:
        answer = c.post("/v1/chat/completions", json=CHAT)
        assert answer.status_code == 502
        assert "could not be reached" in answer.json()["error"]["message"]
        [row] = records(c)
    assert (row["status"], row["http_status"]) == ("upstream_error", 502)


def test_upstream_errors_pass_through_untouched_and_are_recorded(client, fake):
    fake.fail_with = 400
    answer = client.post("/v1/chat/completions", json=CHAT)
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == "boom"
    [row] = records(client)
    assert row["status"] == "upstream_error"
    assert "boom" in row["error"]


def test_api_key_is_required_when_configured_and_not_forwarded(tmp_path, fake):
    with open_client(tmp_path, fake, api_key="k", backend_api_key="up") as c:
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 401
        ok = c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200
        assert c.get("/health").status_code == 200  # health stays open
    assert [h["authorization"] for h in fake.headers] == ["Bearer up"]


def test_the_model_list_passes_through(client):
    answer = client.get("/v1/models")
    assert answer.json()["data"] == [{"id": "toy", "max_model_len": MAX_MODEL_LEN}]


@pytest.mark.parametrize("path", ["/v1/load_lora_adapter", "/v1/unload_lora_adapter"])
def test_vllm_admin_endpoints_are_not_found_and_never_forwarded(client, fake, path):
    answer = client.post(path, json={"lora_name": "x", "lora_path": "/tmp"})
    assert answer.status_code == 404
    assert answer.json()["error"]["type"] == "not_found_error"
    assert fake.requests == [] and fake.admin == []


def test_unknown_route_is_an_openai_error(client):
    answer = client.get("/nope")
    assert answer.status_code == 404
    assert answer.json()["error"]["type"] == "not_found_error"


def test_health_reports_backend_and_recorder(client):
    body = client.get("/health").json()
    assert body["backend"]["ok"] is True
    assert body["recorder"]["dropped"] == 0


# -- feedback ---------------------------------------------------------------------------


def test_feedback_headers_score_the_previous_turn_and_are_not_forwarded(client, fake):
    first = client.post("/v1/chat/completions", json=CHAT, headers={"X-Session-Id": "s"})
    client.post("/v1/chat/completions", json=CHAT, headers={
        "X-Session-Id": "s", "X-NextState-Feedback": "-1",
        "X-NextState-Hint": "Answer in one word."})
    assert not any(k.startswith("x-nextstate") for k in fake.headers[1])
    rows = records(client, submitted=2)
    target = next(r for r in rows if r["turn_id"] == first.headers["x-nextstate-turn-id"])
    [given] = target["feedback"]
    assert (given["score"], given["hint"], given["source"]) == (-1, "Answer in one word.",
                                                                "header")


def test_feedback_for_names_the_turn(client):
    first = client.post("/v1/chat/completions", json=CHAT)
    turn_id = first.headers["x-nextstate-turn-id"]
    client.post("/v1/chat/completions", json=CHAT, headers={
        "X-NextState-Feedback": "+1", "X-NextState-Feedback-For": turn_id})
    rows = {r["turn_id"]: r for r in records(client, submitted=2)}
    assert rows[turn_id]["feedback"][0]["score"] == 1


def test_malformed_feedback_header_is_a_400(client, fake):
    answer = client.post("/v1/chat/completions", json=CHAT,
                         headers={"X-NextState-Feedback": "great"})
    assert answer.status_code == 400
    assert fake.requests == []


def test_feedback_endpoint_records_score_hint_and_comment(client):
    turn_id = client.post("/v1/chat/completions", json=CHAT).headers["x-nextstate-turn-id"]
    answer = client.post("/v1/feedback", json={"turn_id": turn_id, "score": -1,
                                               "hint": "Be brief.", "comment": "meh"})
    assert answer.status_code == 200
    assert answer.json()["turn_id"] == turn_id
    [row] = records(client, submitted=2)
    assert row["feedback"][0] | {"id": None, "created_at": None} == {
        "id": None, "created_at": None, "score": -1, "hint": "Be brief.", "comment": "meh",
        "source": "endpoint"}


def test_feedback_for_a_session_goes_to_its_last_main_turn(client):
    client.post("/v1/chat/completions", json=CHAT, headers={"X-Session-Id": "s9"})
    last = client.post("/v1/chat/completions", json=CHAT, headers={"X-Session-Id": "s9"})
    client.post("/v1/feedback", json={"session_id": "s9", "score": 1,
                                      "source": "adapter:test"})
    rows = {r["turn_id"]: r for r in records(client, submitted=3)}
    assert rows[last.headers["x-nextstate-turn-id"]]["feedback"][0]["source"] == "adapter:test"


@pytest.mark.parametrize("body", [
    {"score": 1},                                   # no target
    {"turn_id": "a", "session_id": "b", "score": 1},  # two targets
    {"turn_id": "a", "score": 2},
    {"turn_id": "a", "score": "yes"},
    {"turn_id": "a", "score": True},
    {"turn_id": 5, "score": 1},
    {"turn_id": "a", "score": 1, "hint": ["x"]},
    {"turn_id": "a", "score": 1, "source": "me"},
])
def test_malformed_feedback_is_a_400(client, body):
    answer = client.post("/v1/feedback", json=body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["type"] == "invalid_request_error"


def test_feedback_for_an_unknown_turn_is_a_404(client):
    answer = client.post("/v1/feedback", json={"turn_id": "nope", "score": 1})
    assert answer.status_code == 404
    assert answer.json()["error"]["type"] == "not_found_error"


def test_feedback_on_another_clients_turn_is_a_409(tmp_path, fake):
    keys = (("alice", "ka"), ("bob", "kb"))
    with open_client(tmp_path, fake, client_keys=keys) as c:
        turn = c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer ka"})
        turn_id = turn.headers["x-nextstate-turn-id"]
        as_bob = c.post("/v1/feedback", json={"turn_id": turn_id, "score": 1},
                        headers={"Authorization": "Bearer kb"})
        assert as_bob.status_code == 409
        records(c)  # once written, the store answers the same
        as_bob = c.post("/v1/feedback", json={"turn_id": turn_id, "score": 1},
                        headers={"Authorization": "Bearer kb"})
        assert as_bob.status_code == 409
        as_alice = c.post("/v1/feedback", json={"turn_id": turn_id, "score": 1},
                          headers={"Authorization": "Bearer ka"})
        assert as_alice.status_code == 200
        [row] = records(c, submitted=2)
    assert row["tenant"] == "alice"
    assert len(row["feedback"]) == 1


def test_next_state_endpoint_pairs_a_pending_turn(client):
    turn_id = client.post("/v1/chat/completions", json=CHAT).headers["x-nextstate-turn-id"]
    tool = {"role": "tool", "tool_call_id": "c1", "content": "Error: division by zero"}
    answer = client.post("/v1/next_state", json={"turn_id": turn_id, "messages": [tool],
                                                 "done": True})
    assert answer.status_code == 200
    [row] = records(client, submitted=2)
    assert row["next_state"] == [tool]
    assert row["next_state_kind"] == "tool"
    assert row["next_state_status"] == "paired"


@pytest.mark.parametrize("body", [{"turn_id": "a"}, {"turn_id": "a", "messages": []},
                                  {"turn_id": "a", "messages": ["x"]},
                                  {"turn_id": "a", "messages": [{"role": "user"}], "done": 1}])
def test_malformed_next_state_is_a_400(client, body):
    assert client.post("/v1/next_state", json=body).status_code == 400


# -- routing to the current adapter ------------------------------------------------------


def publish_adapter(tmp_path, policy: str, version: int) -> str:
    """What the learner does once vLLM has loaded a version: make it current."""
    from nextstate.core.lora import version_name
    from nextstate.core.store import Store

    store = Store(f"sqlite:///{tmp_path}/s.db")
    name = version_name(policy, version)
    store.adapters.stage(version, name, policy, f"/adapters/{name}", {})
    store.adapters.publish(version, [], policy)
    store.close()
    return name


def wait_for_router(client, name):
    router = client.app_state["deps"].router
    deadline = time.monotonic() + 5
    while router.current != name and time.monotonic() < deadline:
        time.sleep(0.01)
    assert router.current == name


def test_policy_name_goes_to_the_current_adapter_and_comes_back_renamed(tmp_path, fake):
    with open_client(tmp_path, fake, policy="toy", adapter_poll_seconds=0.02) as c:
        wait_for_router(c, publish_adapter(tmp_path, "toy", 7))
        whole = c.post("/v1/chat/completions", json={**CHAT, "model": "toy"})
        with c.stream("POST", "/v1/chat/completions",
                      json={**CHAT, "model": "toy", "stream": True}) as s:
            events = [orjson.loads(e[6:]) for e in s.iter_lines()
                      if e.startswith("data: {")]
        base = c.post("/v1/chat/completions", json={**CHAT, "model": "toy@base"})
        rows = records(c, submitted=3)
    assert [r["model"] for r in fake.requests] == ["toy@000007", "toy@000007", "toy"]
    assert whole.json()["model"] == "toy"
    assert {e["model"] for e in events} == {"toy"}
    assert base.json()["model"] == "toy@base"
    assert [r["served_model"] for r in rows] == ["toy@000007", "toy@000007", "toy"]
    assert [r["model"] for r in rows] == ["toy", "toy", "toy@base"]


def test_without_an_adapter_the_policy_is_the_base_model(tmp_path, fake):
    with open_client(tmp_path, fake, policy="student", base_model="toy") as c:
        answer = c.post("/v1/chat/completions", json={**CHAT, "model": "student"})
    assert fake.requests[0]["model"] == "toy"
    assert answer.json()["model"] == "student"


def test_an_adapter_vllm_lost_is_loaded_again_before_policy_traffic(tmp_path, fake):
    """After a vLLM restart its runtime adapters are gone: the proxy loads the current
    one again (from its directory in the store) before sending it policy requests."""
    with open_client(tmp_path, fake, policy="toy", adapter_poll_seconds=0.02) as c:
        name = publish_adapter(tmp_path, "toy", 3)
        wait_for_router(c, name)
        answer = c.post("/v1/chat/completions", json={**CHAT, "model": "toy"})
    assert answer.status_code == 200
    assert ("/v1/load_lora_adapter", {"lora_name": name, "lora_path": f"/adapters/{name}"}) \
        in fake.admin
    assert fake.requests[-1]["model"] == name


def test_policies_do_not_retire_each_others_adapters(tmp_path, fake):
    with open_client(tmp_path, fake, policy="a", base_model="toy",
                     adapter_poll_seconds=0.02) as c:
        name = publish_adapter(tmp_path, "a", 1)
        publish_adapter(tmp_path, "b", 2)
        wait_for_router(c, name)
        c.post("/v1/chat/completions", json={**CHAT, "model": "a"})
    assert fake.requests[0]["model"] == "a@000001"


def test_learner_status_endpoint_reports_the_learner_and_serving_version(tmp_path, fake):
    from nextstate.core.store import Store

    Store(f"sqlite:///{tmp_path}/s.db").status.write({"state": "training"})
    with open_client(tmp_path, fake, policy="toy") as c:
        body = c.get("/v1/learner/status").json()
    assert body["learner"]["state"] == "training"
    assert body["policy"] == "toy" and body["serving"] is None


# -- export, deletion, administration ------------------------------------------------------

KEYS = {"client_keys": (("alice", "ka"), ("bob", "kb")), "admin_key": "root"}
ALICE, BOB, ROOT = ({"Authorization": f"Bearer {k}"} for k in ("ka", "kb", "root"))


def _lines(answer):
    return [orjson.loads(line) for line in answer.content.splitlines()]


def test_export_shows_each_client_only_its_own_turns(tmp_path, fake):
    with open_client(tmp_path, fake, **KEYS) as c:
        c.post("/v1/chat/completions", json=CHAT, headers={**ALICE, "X-Session-Id": "a1"})
        c.post("/v1/chat/completions", json=CHAT, headers={**BOB, "X-Session-Id": "b1"})
        records(c, submitted=2)
        mine = _lines(c.get("/v1/export", headers=ALICE))
        everything = _lines(c.get("/v1/export", headers=ROOT))
        theirs = _lines(c.get("/v1/export?session_id=b1", headers=ALICE))
    assert [t["session_id"] for t in mine] == ["a1"]
    assert sorted(t["session_id"] for t in everything) == ["a1", "b1"]
    assert theirs == []


def test_export_gives_image_references_or_with_images_the_images_as_sent(tmp_path, fake):
    screen = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4" \
             "nGP4z8DwHwAFAAH/iZk9HQAAAABJRU5ErkJggg=="
    chat = {"model": "toy", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is on screen?"},
        {"type": "image_url", "image_url": {"url": screen}}]}]}
    with open_client(tmp_path, fake, **KEYS) as c:
        c.post("/v1/chat/completions", json=chat, headers={**ALICE, "X-Session-Id": "a1"})
        records(c)
        plain = _lines(c.get("/v1/export", headers=ALICE))
        inline = _lines(c.get("/v1/export?with_images=true", headers=ALICE))
    url = plain[0]["request"]["messages"][0]["content"][1]["image_url"]["url"]
    assert url.startswith("nextstate-image:sha256:")
    assert inline[0]["request"]["messages"] == chat["messages"]


def test_a_client_deletes_its_own_session_but_not_anothers(tmp_path, fake):
    with open_client(tmp_path, fake, **KEYS) as c:
        c.post("/v1/chat/completions", json=CHAT, headers={**ALICE, "X-Session-Id": "a1"})
        c.post("/v1/chat/completions", json=CHAT, headers={**BOB, "X-Session-Id": "b1"})
        records(c, submitted=2)
        assert c.delete("/v1/sessions/b1", headers=ALICE).status_code == 404
        assert c.delete("/v1/sessions/a1", headers=ALICE).json()["turns"] == 1
        assert c.delete("/v1/tenants/bob", headers=ALICE).status_code == 403
        assert c.delete("/v1/tenants/bob", headers=ROOT).json()["turns"] == 1
        assert _lines(c.get("/v1/export", headers=ROOT)) == []


def test_adapter_administration_needs_the_admin_key(tmp_path, fake):
    with open_client(tmp_path, fake, policy="toy", adapter_poll_seconds=0.02, **KEYS) as c:
        first = publish_adapter(tmp_path, "toy", 1)
        publish_adapter(tmp_path, "toy", 2)
        assert c.get("/v1/adapters", headers=ALICE).status_code == 403
        assert c.post("/v1/adapters/rollback", json={"version": 1},
                      headers=BOB).status_code == 403
        listed = c.get("/v1/adapters", headers=ROOT).json()["data"]
        assert [(a["version"], a["status"]) for a in listed] == [(1, "previous"),
                                                                 (2, "current")]
        assert c.post("/v1/adapters/rollback", json={"version": 9},
                      headers=ROOT).status_code == 404
        back = c.post("/v1/adapters/rollback", json={"version": 1}, headers=ROOT)
        assert back.json() == {"object": "nextstate.adapter", "name": first,
                               "status": "current"}
        wait_for_router(c, first)
    assert ("/v1/load_lora_adapter", {"lora_name": first,
                                      "lora_path": f"/adapters/{first}"}) in fake.admin


def test_a_rollback_posted_as_text_or_a_form_is_refused(tmp_path, fake):
    """What a web page can send anywhere without asking first (text, a form) never rolls
    back a proxy, even one without keys; only JSON does."""
    with open_client(tmp_path, fake, policy="toy", adapter_poll_seconds=0.02) as c:
        publish_adapter(tmp_path, "toy", 1)
        current = publish_adapter(tmp_path, "toy", 2)
        wait_for_router(c, current)
        for kind in ("text/plain", "application/x-www-form-urlencoded"):
            answer = c.post("/v1/adapters/rollback", content=b'{"version": 1}',
                            headers={"content-type": kind})
            assert answer.status_code == 400
            assert "Content-Type: application/json" in answer.json()["error"]["message"]
        assert c.app_state["deps"].router.current == current
        assert c.post("/v1/adapters/rollback", json={"version": 1}).status_code == 200


def test_deleting_a_tenant_stops_serving_its_users_personal_adapters(tmp_path, fake):
    from nextstate.core.lora import personal_policy

    with open_client(tmp_path, fake, policy="toy", adapter_poll_seconds=0.02, **KEYS) as c:
        shared = publish_adapter(tmp_path, "toy", 1)
        bobs = publish_adapter(tmp_path, personal_policy("toy", "bob"), 2)
        alices = publish_adapter(tmp_path, personal_policy("toy", "alice"), 3)
        wait_for_router(c, shared)
        router = c.app_state["deps"].router
        deadline = time.monotonic() + 5
        while len(router.personal) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        c.post("/v1/chat/completions", json={**CHAT, "model": "toy"}, headers=BOB)
        records(c, submitted=1)
        deleted = c.delete("/v1/tenants/bob", headers=ROOT).json()
        c.post("/v1/chat/completions", json={**CHAT, "model": "toy"}, headers=BOB)
        c.post("/v1/chat/completions", json={**CHAT, "model": "toy"}, headers=ALICE)
    assert (deleted["turns"], deleted["adapters"]) == (1, [bobs])
    assert [r["model"] for r in fake.requests] == [bobs, shared, alices]
    assert ("/v1/unload_lora_adapter", {"lora_name": bobs}) in fake.admin
    assert bobs not in fake.loaded


def test_a_wrong_key_is_refused_everywhere_but_health(tmp_path, fake):
    with open_client(tmp_path, fake, **KEYS) as c:
        for method, path in [("GET", "/v1/export"), ("DELETE", "/v1/sessions/x"),
                             ("GET", "/v1/adapters"), ("POST", "/v1/feedback")]:
            answer = c.request(method, path, headers={"Authorization": "Bearer nope"})
            assert answer.status_code == 401, path
        assert c.get("/health").status_code == 200


@pytest.mark.parametrize("model", ["toy@000007", "toy~alice@000008", "toy~bob"])
def test_no_client_names_an_adapter_version_itself(tmp_path, fake, model):
    """Versions are reached through the policy's name only: nobody reaches another
    user's personal adapter, nor pins a version the learner retired."""
    fake.loaded = {"toy@000007", "toy~alice@000008"}
    with open_client(tmp_path, fake, policy="toy") as c:
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses",
                     "/v1/embeddings"):
            answer = c.post(path, json={**CHAT, "model": model})
            assert answer.status_code == 404, path
            assert answer.json()["error"]["message"] == f"The model `{model}` does not exist."
        anthropic = c.post("/v1/messages", json={**CHAT, "model": model, "max_tokens": 4})
        assert anthropic.status_code == 404 and anthropic.json()["type"] == "error"
    assert fake.requests == []


def test_the_model_list_hides_the_adapter_versions(tmp_path, fake):
    fake.loaded = {"toy@000007", "toy~alice@000008"}
    with open_client(tmp_path, fake, policy="toy") as c:
        answer = c.get("/v1/models")
    assert answer.status_code == 200
    assert answer.json()["data"] == [{"id": "toy", "max_model_len": MAX_MODEL_LEN}]
    assert int(answer.headers["content-length"]) == len(answer.content)
