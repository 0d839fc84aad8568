"""The recording proxy against the real vLLM serving the toy model (agent -> proxy -> vLLM).

The toy model is untrained: its text is noise, but its tokens, logprobs, streaming and
errors are vLLM's own, which is what these tests are about.
"""

from __future__ import annotations

import sqlite3
import time

import httpx
import openai
import orjson
import pytest
from transformers import AutoTokenizer

from nextstate.core.store import Store
from nextstate.core.vllm_server import free_port
from tests.conftest import MODEL_NAME, running_requests

pytestmark = pytest.mark.integration

BASE = {"model": MODEL_NAME, "temperature": 0, "max_tokens": 12}
HELLO = [{"role": "user", "content": "Hello, how are you?"}]


def _without_ids(obj):
    """A response minus what differs between two identical requests."""
    obj = dict(obj)
    obj.pop("id", None)
    obj.pop("created", None)
    return obj


def _events(raw: bytes) -> list:
    """A chat stream's events, ids aside, consecutive chunks of one choice merged: where
    vLLM cuts the text into chunks depends on timing, not on the request (a starved API
    server sends two tokens' deltas in one chunk, or the last with the finish reason)."""
    out: list = []
    for event in raw.split(b"\n\n"):
        if not event:
            continue
        if not event.startswith(b"data: ") or event == b"data: [DONE]":
            out.append(event)
            continue
        chunk = _without_ids(orjson.loads(event[6:]))
        if out and _continues(out[-1], chunk):
            out[-1] = _merged(out[-1], chunk)
        else:
            out.append(chunk)
    return out


def _continues(last, chunk) -> bool:
    """Is ``chunk`` more of the one choice ``last`` was streaming (not yet finished)?"""
    if not isinstance(last, dict) or len(last.get("choices") or []) != 1 \
            or len(chunk.get("choices") or []) != 1:
        return False
    before, after = last["choices"][0], chunk["choices"][0]
    return before.get("index") == after.get("index") and before.get("finish_reason") is None


def _merged(last: dict, chunk: dict) -> dict:
    before, after = last["choices"][0], chunk["choices"][0]
    choice = {**before, **after}
    choice["delta"] = {**before.get("delta", {}), **after.get("delta", {}),
                       "content": (before.get("delta", {}).get("content") or "")
                       + (after.get("delta", {}).get("content") or "")}
    for key, part in (("token_ids", None), ("logprobs", "content")):
        a, b = before.get(key), after.get(key)
        if part is None and (a is not None or b is not None):
            choice[key] = (a or []) + (b or [])
        elif part is not None and (a or b):
            choice[key] = {part: ((a or {}).get(part) or []) + ((b or {}).get(part) or [])}
    return {**last, **chunk, "choices": [choice]}


def test_proxied_response_is_identical_to_direct(vllm, proxy):
    body = {**BASE, "messages": HELLO}
    direct = httpx.post(f"{vllm.url}/v1/chat/completions", json=body, timeout=60)
    proxied = httpx.post(f"{proxy.base_url}/chat/completions", json=body, timeout=60)
    assert direct.status_code == proxied.status_code == 200
    assert _without_ids(proxied.json()) == _without_ids(direct.json())
    assert proxied.json()["choices"][0]["token_ids"] is None  # not asked, not shown


@pytest.mark.parametrize("extra", [{}, {"stream_options": {"include_usage": True}},
                                   {"logprobs": True, "top_logprobs": 2}])
def test_proxied_stream_is_identical_to_direct(vllm, proxy, extra):
    body = {**BASE, "messages": HELLO, "stream": True, **extra}
    direct = httpx.post(f"{vllm.url}/v1/chat/completions", json=body, timeout=60)
    proxied = httpx.post(f"{proxy.base_url}/chat/completions", json=body, timeout=60)
    assert _events(proxied.content) == _events(direct.content)


def test_completions_endpoint_is_identical_and_recorded(vllm, proxy):
    body = {**BASE, "prompt": "Once upon a time"}
    direct = httpx.post(f"{vllm.url}/v1/completions", json=body, timeout=60)
    proxied = httpx.post(f"{proxy.base_url}/completions", json=body, timeout=60)
    assert _without_ids(proxied.json()) == _without_ids(direct.json())
    [turn] = proxy.turns(1)
    assert turn["endpoint"] == "completions"
    assert turn["completion_token_ids"] == direct.json()["choices"][0]["token_ids"] or \
        len(turn["completion_token_ids"]) == direct.json()["usage"]["completion_tokens"]


def test_openai_sdk_gets_answers_and_tokens_decode_to_the_text(proxy, toy_model):
    client = openai.OpenAI(base_url=proxy.base_url, api_key="unused")
    whole = client.chat.completions.create(messages=HELLO, **BASE)
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        messages=HELLO, stream=True, **BASE) if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content
    tokenizer = AutoTokenizer.from_pretrained(toy_model)
    turns = proxy.turns(2)
    assert len(turns) == 2
    for turn in turns:
        text = turn["response"]["choices"][0]["message"]["content"]
        assert tokenizer.decode(turn["completion_token_ids"], skip_special_tokens=True) == text
        assert len(turn["logprobs"]) == len(turn["completion_token_ids"]) > 0
        assert turn["prompt_token_ids"] == tokenizer.apply_chat_template(
            HELLO, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert turn["served_model"] == MODEL_NAME


def test_recorded_logprobs_are_vllms_sampled_logprobs(vllm, proxy):
    body = {**BASE, "messages": HELLO, "logprobs": True}
    direct = httpx.post(f"{vllm.url}/v1/chat/completions", json=body, timeout=60).json()
    httpx.post(f"{proxy.base_url}/chat/completions", json={**BASE, "messages": HELLO},
               timeout=60)
    [turn] = proxy.turns(1)
    expected = [e["logprob"] for e in direct["choices"][0]["logprobs"]["content"]]
    assert turn["logprobs"] == pytest.approx(expected, abs=1e-4)


def test_three_turn_session_is_paired_with_next_states(proxy):
    client = openai.OpenAI(base_url=proxy.base_url, api_key="unused")
    headers = {"X-Session-Id": "session-3"}
    messages = list(HELLO)
    user_says = ["No, that is wrong. Try again.", "Thanks, that helps!"]
    for i in range(3):
        done = {"X-Session-Done": "true"} if i == 2 else {}
        reply = client.chat.completions.create(messages=messages, extra_headers={
            **headers, **done}, **BASE)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
        if i < 2:
            messages.append({"role": "user", "content": user_says[i]})
    turns = proxy.turns(3, session_id="session-3")
    assert [t["turn_index"] for t in turns] == [0, 1, 2]
    assert turns[0]["next_state"] == [{"role": "user", "content": user_says[0]}]
    assert turns[1]["next_state"] == [{"role": "user", "content": user_says[1]}]
    assert [t["next_state_kind"] for t in turns[:2]] == ["user", "user"]
    assert turns[2]["next_state_status"] == "none"  # the session said it was done


def test_session_is_found_without_any_header(proxy):
    client = openai.OpenAI(base_url=proxy.base_url, api_key="unused")
    first = client.chat.completions.create(messages=HELLO, **BASE)
    follow_up = [*HELLO, first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "user", "content": "I meant something shorter."}]
    client.chat.completions.create(messages=follow_up, **BASE)
    client.chat.completions.create(messages=[{"role": "user", "content": "unrelated"}],
                                   **BASE)
    turns = proxy.turns(3)
    assert turns[0]["session_id"] == turns[1]["session_id"] != turns[2]["session_id"]
    assert turns[0]["next_state"] == [{"role": "user", "content": "I meant something shorter."}]
    assert turns[0]["next_turn_id"] == turns[1]["turn_id"]


def test_tool_result_is_the_next_state_of_a_tool_call(proxy):
    """The untrained toy model cannot emit tool calls (and vLLM's guided tool decoding does
    not constrain it reliably), so the agent's history carries the call it made; the
    proxy must still pair the tool result with the turn that preceded it."""
    client = openai.OpenAI(base_url=proxy.base_url, api_key="unused")
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    headers = {"X-Session-Id": "tools-1"}
    client.chat.completions.create(messages=question, tools=tools, extra_headers=headers,
                                   **BASE)
    call = {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    result = {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}
    client.chat.completions.create(messages=[*question, call, result], tools=tools,
                                   extra_headers=headers, **BASE)
    turns = proxy.turns(2, session_id="tools-1")
    assert turns[0]["next_state_kind"] == "tool"
    assert turns[0]["next_state"] == [result]
    assert turns[0]["request"]["tools"] == tools


def test_opt_out_is_forwarded_but_not_recorded(proxy):
    answer = httpx.post(f"{proxy.base_url}/chat/completions",
                        json={**BASE, "messages": HELLO},
                        headers={"X-NextState-Record": "off"}, timeout=60)
    assert answer.status_code == 200
    httpx.post(f"{proxy.base_url}/chat/completions", json={**BASE, "messages": HELLO},
               timeout=60)
    assert len(proxy.turns(2, timeout=2)) == 1


def test_client_disconnect_mid_stream_aborts_upstream_and_keeps_the_partial_turn(vllm, proxy):
    body = {**BASE, "messages": HELLO, "stream": True, "max_tokens": 3000, "ignore_eos": True}
    # On a loaded machine the toy model can write all 3000 tokens (they fit in the sockets'
    # buffers) before this starved client gets to close its connection: then the turn was
    # answered whole, correctly "ok", and there was nothing to abort. That race is the
    # machine's, not the proxy's, so such a try is made again; every other outcome counts.
    for attempt in range(3):
        with httpx.stream("POST", f"{proxy.base_url}/chat/completions", json=body,
                          timeout=60) as answer:
            for i, _ in enumerate(answer.iter_lines()):
                if i > 6:
                    break  # leave mid-stream: the connection is closed here
        deadline = time.monotonic() + 20
        while running_requests(vllm.url) > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert running_requests(vllm.url) == 0  # vLLM stopped generating the 3000 tokens
        turn = proxy.turns(attempt + 1)[-1]
        if turn["status"] == "ok" and len(turn["completion_token_ids"]) == 3000:
            continue  # answered whole before the client left: try again
        assert turn["status"] == "aborted"
        assert 0 < len(turn["completion_token_ids"]) < 3000
        return
    pytest.fail("in 3 tries the model finished before the client's disconnect reached it")


def test_bad_json_is_a_400_openai_error(proxy):
    answer = httpx.post(f"{proxy.base_url}/chat/completions", content=b'{"model": ',
                        headers={"content-type": "application/json"})
    assert answer.status_code == 400
    assert answer.json()["error"]["type"] == "invalid_request_error"


def test_upstream_error_passes_through_and_is_recorded(vllm, proxy):
    body = {"model": "no-such-model", "messages": HELLO}
    direct = httpx.post(f"{vllm.url}/v1/chat/completions", json=body, timeout=30)
    proxied = httpx.post(f"{proxy.base_url}/chat/completions", json=body, timeout=30)
    assert proxied.status_code == direct.status_code == 404
    assert proxied.json() == direct.json()
    [turn] = proxy.turns(1)
    assert (turn["status"], turn["http_status"]) == ("upstream_error", 404)


def test_backend_down_gives_502_and_the_proxy_keeps_serving(start_proxy):
    proxy = start_proxy(f"http://127.0.0.1:{free_port()}")
    for _ in range(2):
        answer = httpx.post(f"{proxy.base_url}/chat/completions",
                            json={**BASE, "messages": HELLO}, timeout=30)
        assert answer.status_code == 502
        assert "could not be reached" in answer.json()["error"]["message"]
    assert httpx.get(f"{proxy.url}/health").json()["backend"]["ok"] is False


def test_store_unavailable_then_back_loses_nothing(vllm, start_proxy, tmp_path):
    db = tmp_path / "locked.db"
    Store(f"sqlite:///{db}").turns.count()  # create the tables
    proxy = start_proxy(vllm.url, store_url=f"sqlite:///{db}", sqlite_busy_timeout=0.1)
    # The proxy, just started, may be in its recorder's first sweep of the store: the lock
    # waits that transaction out instead of failing on it.
    lock = sqlite3.connect(db, timeout=10)
    lock.execute("BEGIN EXCLUSIVE")  # the database is locked for writers
    try:
        for i in range(4):
            answer = httpx.post(f"{proxy.base_url}/chat/completions", json={
                **BASE, "messages": [{"role": "user", "content": f"question {i}"}]},
                timeout=60)
            assert answer.status_code == 200
        time.sleep(1.0)
        health = httpx.get(f"{proxy.url}/health").json()["recorder"]
        assert health["spool_pending"] == 4 and health["store_errors"] > 0
    finally:
        lock.rollback()
        lock.close()
    turns = proxy.turns(4, timeout=40)
    assert sorted(t["request"]["messages"][0]["content"] for t in turns) == [
        f"question {i}" for i in range(4)]
    assert len({t["turn_id"] for t in turns}) == 4
