"""The dialect routes wired into the proxy: recorded as chat turns, answered in the
dialect, kept for previous_response_id, errors in each API's shape (a fake vLLM)."""

from __future__ import annotations

import time

import orjson
import pytest

from nextstate.proxy.dialects import anthropic
from tests.proxy.fake_vllm import LOGPROBS, PROMPT_IDS, TOKEN_IDS, FakeVLLM
from tests.proxy.test_app import open_client, publish_adapter, records, wait_for_router

MESSAGE = {"model": "toy", "max_tokens": 8, "system": "Be brief.",
           "messages": [{"role": "user", "content": "hi"}]}
RESPONSE = {"model": "toy", "instructions": "Be brief.", "input": "hi", "max_output_tokens": 8}


@pytest.fixture
def fake():
    return FakeVLLM()


@pytest.fixture
def client(tmp_path, fake):
    with open_client(tmp_path, fake) as c:
        yield c


def sse(raw: bytes) -> list[tuple[str, dict]]:
    out = []
    for block in raw.split(b"\n\n"):
        lines = dict(line.split(b": ", 1) for line in block.splitlines() if b": " in line)
        if b"data" in lines:
            out.append((lines.get(b"event", b"").decode(), orjson.loads(lines[b"data"])))
    return out


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_messages_turn_is_recorded_as_the_chat_exchange_the_model_saw(client, fake, stream):
    answer = client.post("/v1/messages", json={**MESSAGE, "stream": stream})
    assert answer.status_code == 200
    sent = fake.requests[0]
    assert sent["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "hi"}]
    assert sent["return_token_ids"] is True and sent["logprobs"] is True
    if stream:
        names = [name for name, _ in sse(answer.content)]
        assert names[0] == "message_start" and names[-1] == "message_stop"
        text = "".join(d["delta"]["text"] for n, d in sse(answer.content)
                       if n == "content_block_delta")
    else:
        body = answer.json()
        assert body["type"] == "message" and body["stop_reason"] == "end_turn"
        assert "token_ids" not in answer.text and "logprob" not in answer.text
        text = body["content"][0]["text"]
    assert text == "Hello!"
    [turn] = records(client)
    assert turn["turn_id"] == answer.headers["x-nextstate-turn-id"]
    assert turn["endpoint"] == "messages"
    assert turn["request"]["messages"] == sent["messages"]
    assert (turn["prompt_token_ids"], turn["completion_token_ids"], turn["logprobs"]) == (
        PROMPT_IDS, TOKEN_IDS, LOGPROBS)
    assert turn["untrainable"] is None
    assert turn["dialect"]["request"]["system"] == "Be brief."
    if not stream:
        assert turn["dialect"]["response"] == answer.json()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_responses_turn_is_recorded_and_kept_for_its_id(client, fake, stream):
    answer = client.post("/v1/responses", json={**RESPONSE, "stream": stream})
    assert answer.status_code == 200
    if stream:
        final = sse(answer.content)[-1][1]
        assert final["type"] == "response.completed"
        response = final["response"]
    else:
        response = answer.json()
    assert response["output"][0]["content"][0]["text"] == "Hello!"
    assert response["status"] == "completed"
    [turn] = records(client)
    assert turn["endpoint"] == "responses"
    assert turn["completion_token_ids"] == TOKEN_IDS
    assert turn["dialect"]["response"] == response
    assert client.get(f"/v1/responses/{response['id']}").json() == response


def test_previous_response_id_expands_to_the_conversation_the_model_saw(client, fake):
    """(Instructions are each request's own, as OpenAI has it: Codex sends them each time.)"""
    first = client.post("/v1/responses", json=RESPONSE).json()
    second = client.post("/v1/responses", json={
        "model": "toy", "instructions": "Be brief.", "input": "and then?",
        "previous_response_id": first["id"]})
    assert second.status_code == 200 and second.json()["previous_response_id"] == first["id"]
    assert fake.requests[1]["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "and then?"}]
    one, two = sorted(records(client, 2), key=lambda t: t["created_at"])
    assert two["session_id"] == one["session_id"]  # paired with no header
    assert one["next_state"] == [{"role": "user", "content": "and then?"}]
    assert one["next_turn_id"] == two["turn_id"]


def test_a_kept_response_is_found_in_the_store_by_another_proxy(tmp_path, fake):
    with open_client(tmp_path, fake) as c:
        first = c.post("/v1/responses", json=RESPONSE).json()
        records(c)
    with open_client(tmp_path, fake) as c:  # a new process: nothing in memory
        assert c.get(f"/v1/responses/{first['id']}").json() == first
        again = c.post("/v1/responses", json={"model": "toy", "input": "more",
                                              "previous_response_id": first["id"]})
        assert again.status_code == 200
        assert [m["role"] for m in fake.requests[-1]["messages"]] == [
            "user", "assistant", "user"]  # (no instructions this time)


def test_store_false_and_delete_leave_nothing_to_continue(client, fake):
    unkept = client.post("/v1/responses", json={**RESPONSE, "store": False}).json()
    kept = client.post("/v1/responses", json=RESPONSE).json()
    assert client.delete(f"/v1/responses/{kept['id']}").json() == {
        "id": kept["id"], "object": "response", "deleted": True}
    records(client, 2)
    for gone in (unkept["id"], kept["id"]):
        answer = client.get(f"/v1/responses/{gone}")
        assert answer.status_code == 404 and answer.json()["error"]["type"] == "not_found_error"
        answer = client.post("/v1/responses", json={**RESPONSE, "previous_response_id": gone})
        assert answer.status_code == 404
        assert answer.json()["error"]["param"] == "previous_response_id"
    assert client.delete(f"/v1/responses/{kept['id']}").status_code == 404
    assert len(records(client, 2)) == 2  # both turns are recorded all the same


def test_another_tenants_response_is_unknown(tmp_path, fake):
    with open_client(tmp_path, fake, client_keys=(("a", "ka"), ("b", "kb"))) as c:
        mine = c.post("/v1/responses", json=RESPONSE, headers={"x-api-key": "ka"}).json()
        assert c.get(f"/v1/responses/{mine['id']}", headers={"x-api-key": "ka"}
                     ).status_code == 200
        assert c.get(f"/v1/responses/{mine['id']}", headers={"x-api-key": "kb"}
                     ).status_code == 404


def test_anthropic_tool_results_are_the_next_state_with_their_errors(client, fake):
    tools = [{"name": "run", "input_schema": {"type": "object"}}]
    first = {**MESSAGE, "tools": tools}
    client.post("/v1/messages", json=first)
    client.post("/v1/messages", json={**first, "messages": [
        *first["messages"], {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "is_error": True, "content": "boom"},
            {"type": "text", "text": "fix it"}]}]})
    one, two = sorted(records(client, 2), key=lambda t: t["created_at"])
    assert two["session_id"] == one["session_id"]
    assert one["next_state"] == [
        {"role": "tool", "tool_call_id": "t1", "content": "boom", "status": "error"},
        {"role": "user", "content": "fix it"}]
    assert one["next_state_kind"] == "tool"


def test_session_headers_feedback_and_opt_out_work_as_for_chat(client, fake):
    client.post("/v1/messages", json=MESSAGE, headers={"x-session-id": "s1"})
    client.post("/v1/responses", json={**RESPONSE, "session_id": "s1"},
                headers={"x-nextstate-feedback": "-1", "x-nextstate-hint": "say more"})
    client.post("/v1/messages", json=MESSAGE, headers={"x-nextstate-record": "off"})
    turns = records(client, 2)
    assert {t["session_id"] for t in turns} == {"s1"} and len(turns) == 2
    assert "session_id" not in fake.requests[1]
    given = [f for t in turns for f in t["feedback"]]
    assert [(f["score"], f["hint"]) for f in given] == [(-1, "say more")]


@pytest.mark.parametrize(("path", "body", "kind"), [
    ("/v1/messages", {"model": "toy", "messages": "hi", "max_tokens": 8},
     "invalid_request_error"),
    ("/v1/messages", {"model": "toy", "max_tokens": 8, "messages": [
        {"role": "user", "content": [{"type": "tool_result", "content": [1, 2]}]}]}, None),
    ("/v1/messages", {"model": "toy", "max_tokens": 8, "system": [3],
                      "messages": [{"role": "user", "content": "hi"}]},
     "invalid_request_error"),
    ("/v1/responses", {"model": "toy", "input": [{"type": "function_call"}]},
     "invalid_request_error"),
    ("/v1/responses", {"model": "toy", "input": 3}, "invalid_request_error"),
    ("/v1/responses", {"model": "toy", "input": "x", "tools": [{"type": "function"}]},
     "invalid_request_error"),
])
def test_bad_input_is_a_400_in_the_dialects_shape(client, fake, path, body, kind):
    answer = client.post(path, json=body)
    if kind is None:  # odd but acceptable: it reaches vLLM
        assert answer.status_code == 200
        return
    assert answer.status_code == 400
    error = answer.json()
    if path == "/v1/messages":
        assert error["type"] == "error" and error["error"]["type"] == kind
    else:
        assert error["error"]["type"] == kind
    assert fake.requests == []


def test_vllms_errors_take_the_dialects_shape(client, fake):
    fake.fail_with = 400
    answer = client.post("/v1/messages", json=MESSAGE)
    assert answer.status_code == 400
    assert orjson.loads(answer.content) == orjson.loads(anthropic.error_from_chat(
        400, orjson.dumps({"error": {"message": "boom", "type": "BadRequestError"}})))
    answer = client.post("/v1/responses", json=RESPONSE)
    assert answer.status_code == 400 and answer.json()["error"]["message"] == "boom"
    turns = records(client, 2)
    assert {t["status"] for t in turns} == {"upstream_error"}


def test_the_backend_down_is_a_502_in_the_dialects_shape(tmp_path):
    def down(request):
        import httpx
        raise httpx.ConnectError("refused", request=request)

    with open_client(tmp_path, down) as c:
        answer = c.post("/v1/messages", json=MESSAGE)
        assert answer.status_code == 502 and answer.json()["error"]["type"] == "api_error"
        answer = c.post("/v1/responses", json=RESPONSE)
        assert answer.status_code == 502
        assert answer.json()["error"]["type"] == "backend_unavailable"


def test_the_policy_name_goes_to_its_adapter_and_comes_back(tmp_path, fake):
    with open_client(tmp_path, fake, policy="toy", adapter_poll_seconds=0.02) as c:
        # Published as the learner does (set by hand, the next poll of the store undid it).
        wait_for_router(c, publish_adapter(tmp_path, "toy", 3))
        answer = c.post("/v1/messages", json=MESSAGE)
        assert answer.json()["model"] == "toy"
    assert fake.requests[-1]["model"] == "toy@000003"


@pytest.mark.parametrize("path, body", [("/v1/messages", MESSAGE), ("/v1/responses", RESPONSE)],
                         ids=["messages", "responses"])
def test_a_dialect_turn_gets_its_tenant_its_users_adapter_and_redaction(tmp_path, fake, path,
                                                                         body):
    """As for chat: the key names the tenant, the user header picks the user's own
    adapter (the client still sees the policy's name), and secrets in the dialect's own
    request are scrubbed before the store, in the chat request and the dialect column."""
    from nextstate.core.lora import personal_policy

    secret = "mail me at alice@example.com"
    asked = {**body, "messages": [{"role": "user", "content": secret}]} \
        if path == "/v1/messages" else {**body, "input": secret}
    with open_client(tmp_path, fake, policy="toy", adapter_poll_seconds=0.02,
                     client_keys=(("team-a", "ka"),)) as c:
        mine = publish_adapter(tmp_path, personal_policy("toy", "team-a:alice"), 1)
        router = c.app_state["deps"].router
        for _ in range(200):
            if router.personal:
                break
            time.sleep(0.01)
        answer = c.post(path, json=asked, headers={"x-api-key": "ka",
                                                    "X-NextState-User": "alice"})
        [turn] = records(c)
    assert answer.status_code == 200 and answer.json()["model"] == "toy"
    assert fake.requests[-1]["model"] == mine
    assert (turn["tenant"], turn["user"], turn["served_model"]) == ("team-a", "team-a:alice",
                                                                    mine)
    stored = orjson.dumps([turn["request"], turn["dialect"]]).decode()
    assert "alice@example.com" not in stored and "[REDACTED]" in stored
    assert turn["untrainable"]  # a redacted turn is kept, never trained on
