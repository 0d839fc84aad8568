"""Anthropic Messages over chat completions: what each translation step decides."""

from __future__ import annotations

import json

import orjson
import pytest

from nextstate.proxy.dialects import anthropic
from nextstate.proxy.dialects.anthropic import UnusableAnswer, from_chat, to_chat
from nextstate.proxy.dialects.anthropic_stream import MessagesStream
from nextstate.proxy.errors import InvalidRequest
from tests.proxy.dialects.streams import call, end, role, sse_events, text


def request(**fields: object) -> dict[str, object]:
    return {"model": "toy", "max_tokens": 16,
            "messages": [{"role": "user", "content": "Hi"}], **fields}


def test_system_blocks_join_into_one_leading_message_without_the_billing_header():
    chat = to_chat(request(system=[
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=1; cch=9f"},
        {"type": "text", "text": "You are Claude Code."}, {"type": "text", "text": " Be brief."}]))
    assert chat["messages"] == [{"role": "system", "content": "You are Claude Code. Be brief."},
                                {"role": "user", "content": "Hi"}]


def test_inline_system_messages_stay_in_place_or_merge_when_the_template_needs_it():
    body = request(system="S.", messages=[
        {"role": "user", "content": "Hi"}, {"role": "system", "content": "Reminder."},
        {"role": "user", "content": "Go"}])
    assert [m["role"] for m in to_chat(body)["messages"]] == ["system", "user", "system", "user"]
    merged = to_chat(body, merge_inline_system=True)["messages"]
    assert merged == [{"role": "system", "content": "S.Reminder."},
                      {"role": "user", "content": "Hi"}, {"role": "user", "content": "Go"}]


def test_a_tool_loop_becomes_tool_calls_and_tool_messages():
    chat = to_chat(request(messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True, "content": [
                {"type": "text", "text": "timeout"}, {"type": "text", "text": "retry later"},
                {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]},
            {"type": "text", "text": "Try again."}]}]))
    assistant, tool, image, user = chat["messages"][1:]
    assert assistant == {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "toolu_1", "type": "function",
         "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]}
    # The model sees the result's text (is_error does not reach it: vLLM drops it too).
    assert tool == {"role": "tool", "tool_call_id": "toolu_1", "content": "timeout\nretry later"}
    assert image == {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}
    assert user == {"role": "user", "content": "Try again."}


def test_tool_arguments_use_pythons_json_separators_as_vllm_renders_them():
    chat = to_chat(request(messages=[{"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {"a": [1, 2], "b": "é"}}]}]))
    arguments = chat["messages"][0]["tool_calls"][0]["function"]["arguments"]
    assert arguments == json.dumps({"a": [1, 2], "b": "é"}) == '{"a": [1, 2], "b": "\\u00e9"}'


def test_sampling_stop_and_stream_options_carry_over():
    chat = to_chat(request(stop_sequences=["END"], temperature=0.2, top_p=0.9, top_k=5,
                           metadata={"user_id": "u"}, stream=True))
    assert chat["stop"] == ["END"] and chat["top_k"] == 5 and chat["max_completion_tokens"] == 16
    assert chat["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert "metadata" not in chat and "user" not in chat


@pytest.mark.parametrize(("choice", "chat_choice", "parallel"), [
    ({"type": "auto"}, "auto", True),
    ({"type": "any", "disable_parallel_tool_use": True}, "required", False),
    ({"type": "none"}, "none", True),
    ({"type": "tool", "name": "f"}, {"type": "function", "function": {"name": "f"}}, True),
])
def test_tool_choice_maps_to_chats(choice, chat_choice, parallel):
    chat = to_chat(request(tools=[{"name": "f", "input_schema": {"properties": {}}}],
                           tool_choice=choice))
    assert chat["tool_choice"] == chat_choice and chat["parallel_tool_calls"] is parallel
    assert chat["tools"][0]["function"]["parameters"] == {"properties": {}, "type": "object"}


def test_thinking_maps_to_a_budget_or_the_disabled_effort():
    assert to_chat(request(max_tokens=4096, thinking={"type": "enabled", "budget_tokens": 2048})
                   )["thinking_token_budget"] == 2048
    assert to_chat(request(thinking={"type": "disabled"}), disabled_thinking_effort="low"
                   )["reasoning_effort"] == "low"


@pytest.mark.parametrize("bad", [
    {"max_tokens": 0}, {"model": ""}, {"messages": [{"role": "robot", "content": "x"}]},
    {"messages": [{"role": "user", "content": [{"type": "document"}]}]},
    {"messages": [{"role": "user", "content": [{"type": "tool_removal", "tool": {}}]}]},
    {"tool_choice": {"type": "tool"}}, {"tools": [{"name": "f"}]},
    {"thinking": {"type": "enabled", "budget_tokens": 100}},
])
def test_a_bad_request_is_a_clear_400_in_anthropics_shape(bad):
    with pytest.raises(InvalidRequest) as caught:
        to_chat(request(**bad))
    body = orjson.loads(caught.value.body("anthropic"))
    assert caught.value.status == 400
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"


def chat_answer(message: dict[str, object], finish: str, stop_reason: object = None):
    return {"id": "chatcmpl-9", "object": "chat.completion", "model": "toy",
            "choices": [{"index": 0, "message": {"role": "assistant", **message},
                         "finish_reason": finish, "stop_reason": stop_reason}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 4, "total_tokens": 24,
                      "prompt_tokens_details": {"cached_tokens": 16}}}


def test_an_answer_with_reasoning_text_and_a_tool_call_becomes_three_blocks():
    answer = from_chat(chat_answer({"reasoning": "hm", "content": "On it.", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "f", "arguments": '{"x": 1}'}}]}, "tool_calls"))
    assert [b["type"] for b in answer["content"]] == ["thinking", "text", "tool_use"]
    assert answer["content"][2] == {"type": "tool_use", "id": "call_1", "name": "f",
                                    "input": {"x": 1}}
    assert answer["stop_reason"] == "tool_use" and "stop_sequence" not in answer
    assert answer["usage"] == {"input_tokens": 4, "output_tokens": 4,
                               "cache_read_input_tokens": 16}


@pytest.mark.parametrize(("finish", "matched", "reason", "sequence"), [
    ("length", None, "max_tokens", None), ("stop", "END", "stop_sequence", "END"),
    ("stop", 2, "end_turn", None), ("stop", None, "end_turn", None), ("abort", None, None, None),
])
def test_finish_reasons_become_stop_reasons(finish, matched, reason, sequence):
    answer = from_chat(chat_answer({"content": "x"}, finish, matched))
    assert answer.get("stop_reason") == reason and answer.get("stop_sequence") == sequence


def test_an_empty_answer_is_one_empty_text_block():
    assert from_chat(chat_answer({"content": ""}, "stop"))["content"] == [
        {"type": "text", "text": ""}]


def test_tool_arguments_that_are_not_an_object_are_a_400_as_from_vllm():
    with pytest.raises(UnusableAnswer) as caught:
        from_chat(chat_answer({"content": "", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "true"}}]},
            "tool_calls"))
    assert orjson.loads(caught.value.body("anthropic"))["error"]["type"] == "BadRequestError"


def test_vllms_chat_errors_take_anthropics_shape():
    body = anthropic.error_from_chat(400, orjson.dumps({"error": {
        "message": "toy is not a multimodal model", "type": "BadRequestError", "param": None,
        "code": 400}}))
    assert orjson.loads(body) == {"type": "error", "error": {
        "type": "BadRequestError", "message": "toy is not a multimodal model"}}
    assert orjson.loads(anthropic.error_from_chat(502, b"gateway"))["error"]["message"] == \
        "gateway"


def stream(chunks: list[dict[str, object]]) -> list[tuple[str | None, dict[str, object]]]:
    translator = MessagesStream()
    raw = b"".join(translator.feed(c) for c in chunks) + translator.done()
    return sse_events(raw)


def test_a_text_stream_is_one_block_between_start_and_stop():
    events = stream([role(), text("He"), text("llo"), *end("length")])
    assert [e for e, _ in events] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop"]
    assert events[0][1]["message"]["usage"] == {"input_tokens": 7, "output_tokens": 0}
    assert events[5][1]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert events[5][1]["usage"] == {"input_tokens": 7, "output_tokens": 5}


def test_text_after_a_tool_call_waits_for_the_tool_block_to_close():
    events = stream([role(), text("Let me look."), call(0, "call_1", "f"),
                     call(0, arguments='{"q": '), text("(thinking aloud)"),
                     call(0, arguments='"x"}'), *end("tool_calls")])
    blocks = [(d.get("index"), d.get("content_block", d.get("delta", {})).get("type"))
              for e, d in events if e and e.startswith("content_block")]
    assert blocks == [(0, "text"), (0, "text_delta"), (0, None), (1, "tool_use"),
                      (1, "input_json_delta"), (1, "input_json_delta"), (1, None),
                      (2, "text"), (2, "text_delta"), (2, None)]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_a_stream_error_ends_the_stream_with_an_error_event():
    translator = MessagesStream()
    translator.feed(role())
    raw = translator.feed({"error": {"message": "engine died", "type": "InternalServerError"}})
    assert sse_events(raw) == [("error", {"type": "error", "error": {
        "type": "internal_error", "message": "engine died"}})]
    assert translator.feed(text("late")) == b"" and translator.done() == b""
