"""Messages and Responses through the recording proxy, with the real vLLM and the
official SDKs (agent -> proxy -> vLLM's chat route; proxy -> store).

For each dialect, whole and streamed, with tools and tool results: what the client gets
through the proxy is what vLLM's own dialect route gives at temperature 0 (`parity.view`:
ids and timestamps aside); each turn is recorded with exact tokens (they decode to the
text and tool calls the client got, and are the tokens vLLM samples for the recorded chat
request); a
tool loop's turns pair into one session with no session header, the tool results (with
Anthropic's ``is_error``) as the next state.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
from transformers import AutoTokenizer

from nextstate.core.vllm_server import VLLMProcess, free_port
from nextstate.proxy.settings import ProxySettings
from tests.conftest import MODEL_NAME, ProxyServer
from tests.integration.parity import events, uncached, view
from tests.integration.test_dialect_parity import FUNCTION, MESSAGES, RESPONSES, WEATHER

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def proxy(vllm: VLLMProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyServer]:
    """One proxy for the module (turns are told apart by their contents)."""
    tmp = tmp_path_factory.mktemp("dialects")
    settings = ProxySettings(backends=(vllm.url,), store_url=f"sqlite:///{tmp / 'store.db'}",
                             spool_dir=tmp / "spool")
    server = ProxyServer(replace(settings), free_port()).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tokenizer(toy_model: Any) -> Any:
    return AutoTokenizer.from_pretrained(toy_model)


def ask(base: str, path: str, body: dict[str, Any], **headers: str) -> tuple[int, Any, str]:
    answer = httpx.post(base + path, json=body, headers=headers, timeout=120)
    turn_id = answer.headers.get("x-nextstate-turn-id", "")
    if body.get("stream") and answer.status_code == 200:
        return 200, events(answer.content), turn_id
    return answer.status_code, answer.json(), turn_id


def recorded(proxy: ProxyServer, turn_id: str) -> dict[str, Any]:
    """The turn once the recorder has written it."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        found = [t for t in proxy.turns(0) if t["turn_id"] == turn_id]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"turn {turn_id} was not recorded")


def sampled_by_vllm(vllm: VLLMProcess, chat: dict[str, Any]) -> tuple[list[int], list[int]]:
    """The prompt and completion token ids vLLM's chat route gives the recorded request."""
    body = {**chat, "stream": False, "return_token_ids": True}
    body.pop("stream_options", None)
    answer = httpx.post(f"{vllm.url}/v1/chat/completions", json=body, timeout=120).json()
    return answer["prompt_token_ids"], answer["choices"][0]["token_ids"]


def client_text(path: str, answer: Any, stream: bool) -> str:
    if path == "/v1/messages":
        if stream:
            return "".join(d["delta"].get("text", "") for _, d in answer
                           if d.get("type") == "content_block_delta")
        return "".join(b.get("text", "") for b in answer["content"])
    final = answer[-1][1]["response"] if stream else answer
    return "".join(p["text"] for item in final["output"] if item["type"] == "message"
                   for p in item["content"])


TOOL_CALL = re.compile(r"<tool_call>\n(.*?)\n</tool_call>", re.S)


def client_calls(path: str, answer: Any, stream: bool) -> list[tuple[str, Any]]:
    """The tool calls the client got: (name, arguments as JSON)."""
    if path == "/v1/messages":
        if stream:
            names = {d["index"]: d["content_block"]["name"] for _, d in answer
                     if d.get("type") == "content_block_start"
                     and d["content_block"]["type"] == "tool_use"}
            parts = {i: "".join(d["delta"]["partial_json"] for _, d in answer
                                if d.get("type") == "content_block_delta" and d["index"] == i
                                and d["delta"]["type"] == "input_json_delta") for i in names}
            return [(names[i], orjson.loads(parts[i] or "{}")) for i in sorted(names)]
        return [(b["name"], b["input"]) for b in answer["content"] if b["type"] == "tool_use"]
    final = answer[-1][1]["response"] if stream else answer
    return [(item["name"], orjson.loads(item["arguments"])) for item in final["output"]
            if item["type"] == "function_call"]


CASES = [("/v1/messages", case) for case in ("plain", "system", "tool_loop", "named_tool",
                                             "image")] + \
        [("/v1/responses", case) for case in ("instructions", "tool_loop", "named_tool",
                                              "logprobs", "image")]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize(("path", "case"), CASES, ids=[f"{p[4:]}-{c}" for p, c in CASES])
def test_the_client_sees_vllms_own_answer_and_the_turn_is_recorded_exactly(
        vllm, proxy, tokenizer, path, case, stream):
    family = MESSAGES if path == "/v1/messages" else RESPONSES
    limit = "max_tokens" if path == "/v1/messages" else "max_output_tokens"
    body = {"model": MODEL_NAME, limit: 8, "temperature": 0, **family[case], "stream": stream}
    theirs = ask(vllm.url, path, body)[:2]
    status, ours, turn_id = ask(proxy.url, path, body)
    assert uncached(view((status, ours))) == uncached(view(theirs))
    if case == "image":
        assert status == 400  # refused as vLLM refuses it, and recorded as chat's are
        assert recorded(proxy, turn_id)["status"] == "upstream_error"
        return
    assert status == 200
    turn = recorded(proxy, turn_id)
    assert turn["endpoint"] == path.rsplit("/", 1)[1]
    assert turn["status"] == "ok" and turn["untrainable"] is None
    assert turn["dialect"]["request"]["model"] == MODEL_NAME
    # The recorded tokens are what vLLM samples for the recorded (chat) request...
    prompt, completion = sampled_by_vllm(vllm, turn["request"])
    assert (turn["prompt_token_ids"], turn["completion_token_ids"]) == (prompt, completion)
    assert len(turn["logprobs"]) == len(completion)
    # ... and decode to what the client got: its tool calls (the model writes them in
    # hermes tags), and around them its text.
    decoded = tokenizer.decode(completion, skip_special_tokens=True)
    made = [orjson.loads(call) for call in TOOL_CALL.findall(decoded)]
    assert [(c["name"], c["arguments"]) for c in made] == client_calls(path, ours, stream)
    text, rest = client_text(path, ours, stream), TOOL_CALL.sub("", decoded)
    if stream and not text and rest.startswith("<tool_call>"):
        # A call cut off by max_tokens: vLLM's streaming tool parser holds its text back
        # (its own route too: the client views are equal above).
        assert "</tool_call>" not in rest
    else:
        assert rest == text


def test_a_claude_code_style_conversation_pairs_with_no_session_header(proxy):
    """Claude Code resends the whole conversation, always streams, and starts its system
    prompt with a billing header that changes every request. (The untrained toy model
    cannot make a tool call Anthropic's shape can carry, so the tool results here are in
    the history; the tool_result next state, is_error included, is tested on a fake
    vLLM in tests/proxy/dialects/test_routes.py.)"""
    client = anthropic.Anthropic(base_url=proxy.url, api_key="unused")
    history: list[dict[str, Any]] = [*MESSAGES["tool_loop"]["messages"]]

    def base(n: int) -> dict[str, Any]:
        return {"model": MODEL_NAME, "max_tokens": 12, "extra_body": {"temperature": 0},
                "tools": [WEATHER], "messages": history,
                "system": [{"type": "text", "text": f"x-anthropic-billing-header: cch={n}"},
                           {"type": "text", "text": "You are a coding agent."}]}

    first = client.messages.with_raw_response.create(**base(1))
    reply = first.parse()
    history += [{"role": "assistant", "content": [b.model_dump(exclude_none=True)
                                                  for b in reply.content]},
                {"role": "user", "content": "Now for Oslo."}]
    with client.messages.stream(**base(2)) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(b.text for b in final.content if b.type == "text") == text
    one = recorded(proxy, first.headers["x-nextstate-turn-id"])
    one, two = _wait_paired(proxy, one["turn_id"])
    assert one["next_state"] == [{"role": "user", "content": "Now for Oslo."}]
    assert two["session_id"] == one["session_id"] and two["endpoint"] == "messages"
    # the billing header never reaches the model (it would defeat the prefix cache)
    assert all("billing" not in str(m["content"]) for m in two["request"]["messages"])


def _wait_paired(proxy: ProxyServer, turn_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The turn ``turn_id`` (read again: with its next state) and the turn that gave it
    its next state, once it has one."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        turns = {t["turn_id"]: t for t in proxy.turns(0)}
        nxt = turns[turn_id].get("next_turn_id")
        if nxt in turns:
            return turns[turn_id], turns[nxt]
        time.sleep(0.05)
    raise AssertionError(f"turn {turn_id} was never paired")


@pytest.mark.parametrize("chained", [True, False], ids=["previous_response_id", "resent"])
def test_a_codex_style_tool_loop_pairs_with_no_session_header(proxy, chained):
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused")
    base = {"model": MODEL_NAME, "temperature": 0, "instructions": "You are Codex.",
            "tools": [FUNCTION], "store": chained}
    opening = [{"role": "user", "content": f"Weather in Rome? ({chained})"}]
    first = client.responses.with_raw_response.create(
        **base, input=opening, max_output_tokens=40,
        tool_choice={"type": "function", "name": "get_weather"})
    reply = first.parse()
    [call] = [item for item in reply.output if item.type == "function_call"]
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "21C"}
    if chained:
        with client.responses.stream(**base, previous_response_id=reply.id, input=[output],
                                     max_output_tokens=8) as stream:
            final = stream.get_final_response()
        assert final.previous_response_id == reply.id
        assert client.responses.retrieve(reply.id).id == reply.id
    else:
        items = [*opening, *[item.model_dump(exclude_none=True) for item in reply.output],
                 output]
        client.responses.create(**base, input=items, max_output_tokens=8)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(reply.id)  # store: false keeps nothing
    one = recorded(proxy, first.headers["x-nextstate-turn-id"])
    one, two = _wait_paired(proxy, one["turn_id"])
    assert one["next_state"] == [{"role": "tool", "tool_call_id": call.call_id,
                                  "content": "21C"}]
    assert two["session_id"] == one["session_id"] and two["endpoint"] == "responses"
    seen = two["request"]["messages"]
    assert [m["role"] for m in seen] == ["system", "user", "assistant", "tool"]


def test_count_tokens_passes_through(vllm, proxy):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hello"}]}
    theirs = httpx.post(f"{vllm.url}/v1/messages/count_tokens", json=body, timeout=60)
    ours = httpx.post(f"{proxy.url}/v1/messages/count_tokens", json=body, timeout=60)
    assert (ours.status_code, ours.json()) == (theirs.status_code, theirs.json())
