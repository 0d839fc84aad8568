"""The client's view through the proxy is vLLM's own, for Messages and Responses.

agent -> (vLLM's /v1/messages | /v1/responses)  vs  agent -> proxy -> vLLM's chat route.
For each request of a family (plain, system prompt, multi-turn, a tool loop with a tool
call and its result, forced tool calls, stop strings, an image the text-only model
refuses, a bad request), streamed and not, at temperature 0: the answer from vLLM's own
dialect route and the answer through the recording proxy are the same after
`parity.view` (ids and timestamps aside; stream chunking aside) and `uncached` (the
prefix cache's share of the prompt: it depends on what ran before). The official SDKs
parse both alike. The toy model answers noise: fine, the noise must match.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from nextstate.core.vllm_server import VLLMProcess, free_port
from nextstate.proxy.settings import ProxySettings
from tests.conftest import MODEL_NAME, ProxyServer
from tests.integration.parity import events, uncached, view

pytestmark = pytest.mark.integration

WEATHER = {"name": "get_weather", "description": "Get the weather",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}
FUNCTION = {"type": "function", "name": WEATHER["name"], "description": WEATHER["description"],
            "parameters": WEATHER["input_schema"]}
IMAGE = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9aw"
         "AAAABJRU5ErkJggg==")  # a 1x1 PNG

MESSAGES = {
    "plain": {"messages": [{"role": "user", "content": "Hello there"}]},
    "system": {"system": [{"type": "text", "text": "x-anthropic-billing-header: cch=1"},
                          {"type": "text", "text": "You are terse."}],
               "messages": [{"role": "user", "content": "Hello"}]},
    "multi_turn": {"system": "Be kind.", "messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "How are"},
                                     {"type": "text", "text": "you?"}]}]},
    "tool_loop": {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
             "input": {"city": "Paris", "note": "°C"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
             "content": [{"type": "text", "text": "timeout"}, {"type": "text", "text": "retry"}]},
            {"type": "text", "text": "Try again."}]}]},
    "forced_tool": {"tools": [WEATHER], "tool_choice": {"type": "any"}, "max_tokens": 40,
                    "messages": [{"role": "user", "content": "hi"}]},
    "named_tool": {"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "get_weather"},
                   "messages": [{"role": "user", "content": "hi"}]},
    "stop_sequence": {"stop_sequences": ["\n\n"], "messages": [{"role": "user", "content": "Hi"}]},
    "image": {"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": IMAGE}},
        {"type": "text", "text": "What is this?"}]}]},
}
RESPONSES = {
    "plain": {"input": "Hello there"},
    "instructions": {"instructions": "You are terse.", "input": "Hello"},
    "multi_turn": {"input": [
        {"type": "message", "role": "developer",
         "content": [{"type": "input_text", "text": "Be kind."}]},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "And?"}]}]},
    "tool_loop": {"tools": [FUNCTION], "input": [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Let me check."}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather",
         "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "18C and sunny"}]},
    "forced_tool": {"tools": [FUNCTION], "tool_choice": "required", "max_output_tokens": 40,
                    "input": "hi"},
    "named_tool": {"tools": [FUNCTION], "max_output_tokens": 40,
                   "tool_choice": {"type": "function", "name": "get_weather"}, "input": "hi"},
    "logprobs": {"input": "Hello", "include": ["message.output_text.logprobs"],
                 "top_logprobs": 2},
    "json_object": {"input": "Hello", "text": {"format": {"type": "json_object"}}},
    "continued": {"input": [{"role": "user", "content": "Hi"}, {
        "type": "message", "role": "assistant", "status": "incomplete",
        "content": [{"type": "output_text", "text": "Hello, I"}]}]},
    "image": {"input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": f"data:image/png;base64,{IMAGE}"},
        {"type": "input_text", "text": "What is this?"}]}]},
}


@pytest.fixture(scope="module")
def proxy(vllm: VLLMProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyServer]:
    """The recording proxy in front of the same vLLM, for the module."""
    tmp = tmp_path_factory.mktemp("parity")
    server = ProxyServer(ProxySettings(
        backends=(vllm.url,), store_url=f"sqlite:///{tmp / 'store.db'}",
        spool_dir=tmp / "spool"), free_port()).start()
    yield server
    server.stop()


def ask(base: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    answer = httpx.post(base + path, json=body, timeout=120)
    if body.get("stream") and answer.status_code == 200:
        assert answer.headers["content-type"].startswith("text/event-stream")
        return 200, events(answer.content)
    return answer.status_code, answer.json()


def both(vllm: VLLMProcess, proxy: ProxyServer, path: str,
         body: dict[str, Any]) -> tuple[Any, Any]:
    theirs = ask(vllm.url, path, body)
    ours = ask(proxy.url, path, body)
    return uncached(view(theirs)), uncached(view(ours))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("case", sorted(MESSAGES))
def test_messages_answers_are_vllms_own(vllm, proxy, case, stream):
    body = {"model": MODEL_NAME, "max_tokens": 8, "temperature": 0, **MESSAGES[case],
            "stream": stream}
    theirs, ours = both(vllm, proxy, "/v1/messages", body)
    if case == "forced_tool" and not stream:
        # The toy model's forced call has arguments `true`: vLLM cannot make that a
        # tool_use block either. Same status and error type; the message is ours.
        assert ours[0] == theirs[0] == 400
        assert ours[1]["error"]["type"] == theirs[1]["error"]["type"] == "BadRequestError"
        return
    assert ours == theirs
    if case == "image":
        assert ours[0] == 400  # refused the same way, in Anthropic's shape
    elif stream:
        assert [name for name, _ in ours[1]][0] == "message_start"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("case", sorted(RESPONSES))
def test_responses_answers_are_vllms_own(vllm, proxy, case, stream):
    body = {"model": MODEL_NAME, "max_output_tokens": 8, "temperature": 0, **RESPONSES[case],
            "stream": stream}
    theirs, ours = both(vllm, proxy, "/v1/responses", body)
    assert ours == theirs
    if case == "image":
        assert ours[0] == 400
    elif case in ("forced_tool", "named_tool"):
        final = ours[1][-1][1]["response"] if stream else ours[1]
        assert [item["type"] for item in final["output"]] == ["function_call"]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/messages", {"messages": [{"role": "robot", "content": "Hi"}], "max_tokens": 8}, None),
    ("/v1/messages", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0}, None),
    ("/v1/responses", {"input": "Hi", "tool_choice": "required"}, "tool_choice"),
    ("/v1/responses", {"input": [{"type": "item_reference", "id": "x"}]}, "input"),
])
def test_a_bad_request_is_a_400_in_the_dialects_shape(vllm, proxy, path, body, param):
    body = {"model": MODEL_NAME, **body}
    theirs, ours = both(vllm, proxy, path, body)
    assert ours[0] == theirs[0] == 400
    if path == "/v1/messages":
        # vLLM answers its own validation errors in OpenAI's shape even here; ours take
        # Anthropic's, which is what an Anthropic client reads.
        assert ours[1]["type"] == "error"
        assert ours[1]["error"]["type"] == "invalid_request_error"
    else:
        assert ours[1]["error"]["param"] == theirs[1]["error"]["param"] == param


def sdk_view(obj: Any) -> Any:
    return uncached(view(obj.model_dump()))


def test_the_anthropic_sdk_reads_ours_as_it_reads_vllms(vllm, proxy):
    chat = {"model": MODEL_NAME, "max_tokens": 8, "extra_body": {"temperature": 0},
            "system": "You are terse.", "messages": [{"role": "user", "content": "Hello"}]}
    views = []
    for base in (vllm.url, proxy.url):
        client = anthropic.Anthropic(base_url=base, api_key="unused")
        whole = client.messages.create(**chat)
        with client.messages.stream(**chat) as stream:
            texts = list(stream.text_stream)
            final = stream.get_final_message()
        assert "".join(texts) == final.content[0].text == whole.content[0].text
        with pytest.raises(anthropic.BadRequestError):
            client.messages.create(**{**chat, "max_tokens": 0})
        views.append((sdk_view(whole), sdk_view(final)))
    assert views[0] == views[1]
    assert views[1][0]["stop_reason"] == "max_tokens"


def test_the_openai_sdk_reads_ours_as_it_reads_vllms(vllm, proxy):
    request = {"model": MODEL_NAME, "max_output_tokens": 8, "temperature": 0,
               "tools": [FUNCTION], "tool_choice": "required", "input": "hi"}
    views = []
    for base in (vllm.url, proxy.url):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        whole = client.responses.create(**{**request, "max_output_tokens": 40})
        with client.responses.stream(**{**request, "max_output_tokens": 40}) as stream:
            kinds = [event.type for event in stream]
            final = stream.get_final_response()
        text = client.responses.create(model=MODEL_NAME, input="Hello", temperature=0,
                                       max_output_tokens=8)
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        assert whole.output[0].type == final.output[0].type == "function_call"
        views.append((sdk_view(whole), sdk_view(final), kinds, sdk_view(text)))
    assert views[0] == views[1]


def test_previous_response_id_continues_the_conversation_the_model_saw(proxy):
    """vLLM keeps no responses by default (404); the proxy keeps them itself, and the
    conversation the model saw is what is recorded."""
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused")
    first = client.responses.create(model=MODEL_NAME, instructions="Be terse.",
                                    input="Weather?", max_output_tokens=40, temperature=0,
                                    tools=[FUNCTION], tool_choice="required")
    call = first.output[0]
    assert call.type == "function_call"
    second = client.responses.create(
        model=MODEL_NAME, previous_response_id=first.id, max_output_tokens=8, temperature=0,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18C"}])
    assert second.previous_response_id == first.id
    seen = recorded(proxy, second.id)["request"]["messages"]
    assert [m["role"] for m in seen] == ["user", "assistant", "tool"]  # instructions stay put
    assert seen[1]["tool_calls"][0]["function"]["arguments"] == call.arguments
    assert seen[2] == {"role": "tool", "content": "18C", "tool_call_id": call.call_id}
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL_NAME, input="Hi", previous_response_id="resp_no")


def recorded(proxy: ProxyServer, response_id: str) -> dict[str, Any]:
    """The turn that answered ``response_id``, once the recorder has written it."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for turn in proxy.turns(0):
            if ((turn.get("dialect") or {}).get("response") or {}).get("id") == response_id:
                return turn
        time.sleep(0.05)
    raise AssertionError(f"no turn recorded for {response_id}")
