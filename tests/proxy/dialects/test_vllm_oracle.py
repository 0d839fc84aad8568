"""The translators against vLLM's own conversion code, run in-process as the oracle.

vLLM's ``/v1/messages`` and ``/v1/responses`` are built from pure steps (request to chat
request, chat answer to Messages answer, chat chunks to Anthropic events, parser deltas to
Responses events). Feeding them and our translators the same inputs covers what the toy
model never produces (reasoning, text after a tool call, parallel calls, stop strings);
the integration parity tests cover the rest end to end. Needs vLLM importable (no
server): skipped, saying so, where it is not installed, and failed in CI.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from typing import Any

import orjson
import pytest

from nextstate.proxy.dialects import anthropic
from nextstate.proxy.dialects.anthropic_stream import MessagesStream
from nextstate.proxy.dialects.responses import Served
from nextstate.proxy.dialects.responses import to_chat as responses_to_chat
from nextstate.proxy.dialects.responses_stream import ResponsesStream
from tests.integration.parity import view
from tests.proxy.dialects.streams import call, chunk, end, role, sse_events, text

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("NEXTSTATE_REQUIRE_INTEGRATION"):
        pytest.fail("vLLM is not installed but its oracle tests are required here",
                    pytrace=False)
    pytest.skip("vLLM is not installed (pip install 'nextstate[cpu]')", allow_module_level=True)

from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest  # noqa: E402
from vllm.entrypoints.anthropic.serving import AnthropicServingMessages  # noqa: E402
from vllm.entrypoints.generate.base.protocol import (  # noqa: E402
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
)
from vllm.entrypoints.openai.chat_completion.protocol import (  # noqa: E402
    ChatCompletionRequest,
    ChatCompletionResponse,
)
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest  # noqa: E402
from vllm.entrypoints.openai.responses.streaming_events import (  # noqa: E402
    SimpleStreamingEventProcessor,
    _StateType,
    split_delta,
)
from vllm.entrypoints.openai.responses.utils import construct_input_messages  # noqa: E402

TOOLS = [{"name": "weather", "description": "Weather", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}}}},
    {"name": "clock", "input_schema": {"properties": {}}, "strict": True}]
MESSAGES_REQUESTS = {
    "plain": {"messages": [{"role": "user", "content": "Hi"}]},
    "system_blocks": {"system": [
        {"type": "text", "text": "x-anthropic-billing-header: cch=1"},
        {"type": "text", "text": "A."}, {"type": "text", "text": "B."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                  {"type": "text", "text": ""}]}]},
    "inline_system": {"system": "S", "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "system", "content": [{"type": "text", "text": "reminder"}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hm", "signature": "x"},
            {"type": "redacted_thinking", "data": "zz"}, {"type": "text", "text": "Ok"}]},
        {"role": "user", "content": "More"}]},
    "tool_loop": {"tools": TOOLS, "tool_choice": {"type": "any",
                                                  "disable_parallel_tool_use": True},
                  "stop_sequences": ["END"], "temperature": 0.5, "top_k": 3, "stream": True,
                  "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "t2", "name": "clock", "input": {}},
            {"type": "tool_result", "tool_use_id": "t0", "content": [{"type": "text",
                                                                      "text": "odd"}]}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "is_error": True,
             "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"},
                         {"type": "image", "source": {"type": "base64",
                                                      "media_type": "image/png", "data": "AA"}},
                         {"type": "tool_reference", "tool_name": "clock"}]},
            {"type": "tool_result", "tool_use_id": "t2", "content": "12:00"}]}]},
    "thinking": {"max_tokens": 4096, "thinking": {"type": "enabled", "budget_tokens": 2048},
                 "output_config": {"effort": "high", "format": {
                     "type": "json_schema", "schema": {"type": "object"}}},
                 "messages": [{"role": "user", "content": "Hi"}]},
    "tool_changes": {"tools": TOOLS, "messages": [
        {"role": "system", "content": [
            {"type": "tool_removal", "tool": {"type": "tool_reference", "name": "clock"}},
            {"type": "tool_addition", "tool": {"type": "tool_definition", "definition": {
                "name": "search", "input_schema": {"type": "object"}}}}]},
        {"role": "user", "content": "Find it"}]},
}


@pytest.mark.parametrize("name", sorted(MESSAGES_REQUESTS))
@pytest.mark.parametrize("merge", [False, True])
def test_a_messages_request_becomes_the_chat_request_vllm_builds(name, merge):
    body = {"model": "toy", "max_tokens": 64, **MESSAGES_REQUESTS[name]}
    theirs = AnthropicServingMessages.to_chat_completion_request(
        AnthropicMessagesRequest.model_validate(body), merge_inline_system=merge)
    ours = ChatCompletionRequest.model_validate(anthropic.to_chat(body, merge_inline_system=merge))
    expected, got = theirs.model_dump(), ours.model_dump()
    for dump in (expected, got):  # unset and empty alike: no stop strings, no tool use
        dump.pop("request_id")
        dump["stop"] = dump["stop"] or []
        if not dump["tools"]:
            dump["tool_choice"] = dump["tool_choice"] or "none"
    assert got == expected


def chat_answer(message: dict[str, Any], finish: str, stop_reason: Any = None) -> dict[str, Any]:
    return {"id": "chatcmpl-7", "object": "chat.completion", "created": 1, "model": "toy",
            "choices": [{"index": 0, "message": {"role": "assistant", **message},
                         "finish_reason": finish, "stop_reason": stop_reason}],
            "usage": {"prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49,
                      "prompt_tokens_details": {"cached_tokens": 32}}}


ANSWERS = [
    chat_answer({"content": "Hello"}, "stop"),
    chat_answer({"content": "Hello"}, "stop", "END"),
    chat_answer({"content": ""}, "length"),
    chat_answer({"reasoning": "plan", "content": "Calling", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "weather",
                                                      "arguments": '{"city": "Rome"}'}},
        {"id": "c2", "type": "function", "function": {"name": "clock", "arguments": "{}"}}]},
        "tool_calls"),
    chat_answer({"content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        "stop", "END"),
]


@pytest.mark.parametrize("answer", ANSWERS, ids=range(len(ANSWERS)))
def test_a_chat_answer_becomes_the_messages_answer_vllm_gives(answer):
    theirs = AnthropicServingMessages.messages_full_converter(
        None, ChatCompletionResponse.model_validate(answer)).model_dump(exclude_none=True)
    assert view(anthropic.from_chat(answer)) == view(theirs)


STREAMS = {
    "text": [role(), text("He"), text("llo"), *end("stop", "END")],
    "length": [role(), text("abc"), *end("length")],
    "tool_then_text": [role(), text("Let me see."), call(0, "c1", "weather"),
                       call(0, arguments='{"city": '), text("hmm"), call(0, arguments='"Rome"}'),
                       *end("tool_calls")],
    "two_tools": [role(), call(0, "c1", "weather", '{"city": "Paris"}'),
                  call(1, "c2", "clock"), call(1, arguments="{}"), *end("tool_calls")],
    "cut_tool": [role(), call(0, "c1", "weather"), call(0, arguments='{"ci'), *end("stop", "X")],
    "thinking": [role(), chunk({"reasoning": "let me think"}), chunk({"reasoning": " more"}),
                 text("Answer"), *end("stop")],
    "empty": [role(), *end("stop")],
}


async def _vllm_events(chunks: list[dict[str, Any]]) -> list[str]:
    async def source() -> Any:
        for c in chunks:
            yield "data: " + orjson.dumps(c).decode() + "\n\n"
        yield "data: [DONE]\n\n"
    return [e async for e in AnthropicServingMessages.message_stream_converter(None, source())]


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_chat_chunks_become_the_anthropic_events_vllm_streams(name):
    theirs = sse_events("".join(asyncio.run(_vllm_events(STREAMS[name]))).encode())
    translator = MessagesStream()
    ours = sse_events(b"".join(translator.feed(c) for c in STREAMS[name]) + translator.done())
    assert view(ours) == view(theirs)


def _vllm_responses_events(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    processor = SimpleStreamingEventProcessor()
    events: list[Any] = []
    for c in chunks:
        for choice in c["choices"]:
            delta = choice["delta"]
            message = DeltaMessage(content=delta.get("content"), reasoning=delta.get("reasoning"),
                                   tool_calls=[DeltaToolCall(
                                       id=t.get("id"), type=t.get("type"), index=t["index"],
                                       function=DeltaFunctionCall(**t["function"]))
                                       for t in delta.get("tool_calls") or []])
            for part in split_delta(message):
                target, tool_call = processor.resolve_target_state(part)
                if target == _StateType.NONE:
                    continue
                if processor.needs_transition(target, tool_call):
                    events += processor.close_current()
                    events += processor.open(target, tool_call)
                events += processor.emit_delta(part, None)
    events += processor.close_current()
    return [e.model_dump(mode="json", by_alias=True) for e in events]


# vLLM's Responses processor fails on "tool_then_text" (arguments going on after text
# reopen a call with no name); ours holds the text (test_responses_stream.py).
@pytest.mark.parametrize("name", sorted(set(STREAMS) - {"tool_then_text"}))
def test_chat_chunks_become_the_responses_events_vllm_streams(name):
    translator = ResponsesStream({"model": "toy", "input": "Hi"}, Served())
    raw = b"".join(translator.feed(c) for c in STREAMS[name]) + translator.done()
    ours = [d for _, d in sse_events(raw)][2:-1]  # between in_progress and completed
    for event in ours:
        event.pop("sequence_number")
    theirs = _vllm_responses_events(STREAMS[name])
    for event in theirs:
        event.pop("sequence_number")
    assert view(ours) == view(theirs)


RESPONSES_INPUTS = {
    "string": "Hi",
    "tool_loop": [
        {"role": "user", "content": "Weather?"},
        {"type": "reasoning", "id": "rs_1", "summary": [],
         "content": [{"type": "reasoning_text", "text": "plan"}]},
        {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "clock", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "18C"},
        {"type": "function_call_output", "call_id": "c2", "output": "noon"},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "It is 18C.", "annotations": []}]},
        {"role": "assistant", "content": "And noon."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Thx"}]}],
}


def _plain(messages: list[Any]) -> list[dict[str, Any]]:
    """Chat messages with content parts named as the chat route names them."""
    out = []
    for message in messages:
        message = {k: v for k, v in dict(message).items()
                   if k in ("role", "content", "tool_calls", "tool_call_id", "reasoning", "name")}
        if isinstance(message.get("content"), list):
            message["content"] = [{"type": "text", "text": p["text"]} if p.get("type") in (
                "input_text", "output_text") else p for p in message["content"]]
        if "tool_calls" in message:
            message["tool_calls"] = [dict(c, function=dict(c["function"]))
                                     for c in message["tool_calls"]]
        out.append(message)
    return out


@pytest.mark.parametrize("name", sorted(RESPONSES_INPUTS))
def test_responses_input_becomes_the_messages_vllm_renders(name):
    body = {"model": "toy", "instructions": "Be brief.", "input": RESPONSES_INPUTS[name]}
    request = ResponsesRequest.model_validate(orjson.loads(orjson.dumps(body)))
    theirs = construct_input_messages(request_instructions=request.instructions,
                                      request_input=request.input)
    assert _plain(responses_to_chat(body)["messages"]) == _plain(theirs)
