"""OpenAI Responses over chat completions: the request, the echo, the whole answer."""

from __future__ import annotations

import pytest

from nextstate.proxy.dialects.responses import Served, frame, from_chat, to_chat
from nextstate.proxy.errors import InvalidRequest

TOOL = {"type": "function", "name": "weather", "description": "Weather by city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def request(**fields: object) -> dict[str, object]:
    return {"model": "toy", "input": "Hi", **fields}


def test_a_string_input_and_instructions_become_system_and_user_messages():
    chat = to_chat(request(instructions="Be terse.", max_output_tokens=8, temperature=0))
    assert chat["messages"] == [{"role": "system", "content": "Be terse."},
                                {"role": "user", "content": "Hi"}]
    assert chat["max_tokens"] == 8 and chat["temperature"] == 0 and "tools" not in chat


def test_a_codex_style_tool_loop_becomes_one_assistant_turn_and_its_tool_results():
    chat = to_chat(request(tools=[TOOL], input=[
        {"type": "message", "role": "developer",
         "content": [{"type": "input_text", "text": "You are Codex."}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Go"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "plan"}]},
        {"type": "message", "role": "assistant", "id": "msg_1",
         "content": [{"type": "output_text", "text": "Looking.", "annotations": []}]},
        {"type": "function_call", "call_id": "call_1", "name": "weather",
         "arguments": '{"city":"Paris"}'},
        {"type": "function_call", "call_id": "call_2", "name": "weather",
         "arguments": '{"city":"Rome"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
        {"type": "function_call_output", "call_id": "call_2", "output": "25C"}]))
    assert chat["messages"] == [
        {"role": "developer", "content": [{"type": "text", "text": "You are Codex."}]},
        {"role": "user", "content": [{"type": "text", "text": "Go"}]},
        {"role": "assistant", "reasoning": "plan", "content": "Looking.", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_2", "type": "function",
             "function": {"name": "weather", "arguments": '{"city":"Rome"}'}}]},
        {"role": "tool", "content": "18C", "tool_call_id": "call_1"},
        {"role": "tool", "content": "25C", "tool_call_id": "call_2"}]
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "weather", "description": "Weather by city", "parameters": TOOL["parameters"]}}]
    assert chat["tool_choice"] == "auto"


def test_built_in_tools_are_not_shown_to_the_model():
    chat = to_chat(request(tools=[{"type": "web_search_preview"}, TOOL]))
    assert [t["function"]["name"] for t in chat["tools"]] == ["weather"]


def test_a_partial_assistant_message_is_continued():
    chat = to_chat(request(input=[{"role": "user", "content": "Hi"}, {
        "type": "message", "role": "assistant", "status": "incomplete",
        "content": [{"type": "output_text", "text": "Hello, I"}]}]))
    assert chat["messages"][-1] == {"role": "assistant", "content": "Hello, I"}
    assert chat["continue_final_message"] is True and chat["add_generation_prompt"] is False


def test_options_map_onto_chats():
    chat = to_chat(request(tools=[TOOL], tool_choice={"type": "function", "name": "weather"},
                           text={"format": {"type": "json_schema", "name": "w",
                                            "schema": {"type": "object"}}},
                           reasoning={"effort": "low"}, include=["message.output_text.logprobs"],
                           top_logprobs=2, stream=True, parallel_tool_calls=False))
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert chat["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "w", "schema": {"type": "object"}}}
    assert chat["reasoning_effort"] == "low" and chat["parallel_tool_calls"] is False
    assert chat["logprobs"] is True and chat["top_logprobs"] == 2
    assert chat["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("bad", [
    {"input": None}, {"tool_choice": "required"},
    {"tools": [TOOL], "tool_choice": {"type": "function", "name": "other"}},
    {"input": [{"type": "item_reference", "id": "x"}]},
    {"input": [{"type": "reasoning", "encrypted_content": "abc", "summary": []}]},
    {"input": [{"type": "function_call", "call_id": "c"}]},
    {"tools": [{"type": "custom", "name": "apply_patch"}]}, {"background": True},
    {"prompt": {"id": "p"}},
])
def test_a_bad_request_is_a_clear_400(bad):
    body = request(**bad)
    if bad.get("input", "") is None:
        del body["input"]
    with pytest.raises(InvalidRequest):
        to_chat(body)


def test_the_frame_echoes_the_request_with_the_sampling_values_used():
    echo = frame(request(tools=[TOOL], temperature=0, instructions="I", metadata={"k": "v"}),
                 response_id="resp_1", created_at=5, model="toy", prompt_tokens=100,
                 served=Served(max_model_len=4096))
    assert echo["temperature"] == 0.0 and echo["top_p"] == 1.0
    assert echo["max_output_tokens"] == 3996 and echo["tool_choice"] == "auto"
    assert echo["tools"][0]["name"] == "weather" and echo["tools"][0]["strict"] is None
    assert echo["status"] == "in_progress" and echo["output"] == [] and echo["usage"] is None
    assert frame(request(), response_id="r", created_at=0, model="toy", prompt_tokens=None,
                 served=Served())["tool_choice"] == "none"


def chat_answer(message: dict[str, object], finish: str, **extra: object) -> dict[str, object]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000,
            "model": "toy", "choices": [{"index": 0, "message": {"role": "assistant", **message},
                                         "finish_reason": finish, **extra}],
            "usage": {"prompt_tokens": 30, "completion_tokens": 8, "total_tokens": 38}}


def test_an_answer_becomes_reasoning_message_and_function_call_items():
    out = from_chat(chat_answer({"reasoning": "hm", "content": "Calling.", "tool_calls": [
        {"id": "chatcmpl-tool-1", "type": "function",
         "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]}, "tool_calls"),
        request(tools=[TOOL]), Served(max_model_len=4096))
    assert [i["type"] for i in out["output"]] == ["reasoning", "message", "function_call"]
    assert out["output"][1]["content"][0]["text"] == "Calling."
    call = out["output"][2]
    assert (call["call_id"], call["name"], call["arguments"], call["status"]) == (
        "chatcmpl-tool-1", "weather", '{"city": "Paris"}', "completed")
    assert out["status"] == "completed" and out["incomplete_details"] is None
    assert out["usage"]["input_tokens"] == 30 and out["usage"]["total_tokens"] == 38
    assert out["max_output_tokens"] == 4066 and out["id"].startswith("resp_")


def test_an_answer_cut_at_the_length_limit_is_incomplete():
    out = from_chat(chat_answer({"content": "abc"}, "length"), request(), Served())
    assert out["status"] == "incomplete"
    assert out["incomplete_details"] == {"reason": "max_output_tokens"}


def test_an_empty_answer_has_no_message_item_unless_vllm_runs_without_a_parser():
    answer = chat_answer({"content": ""}, "stop")
    assert from_chat(answer, request(), Served())["output"] == []
    bare = from_chat(answer, request(), Served(parser=False))["output"]
    assert [(i["type"], i["content"]) for i in bare] == [("message", [])]


def test_asked_logprobs_come_back_on_the_text_in_the_responses_shape():
    answer = chat_answer({"content": "Hi"}, "stop", logprobs={"content": [
        {"token": "Hi", "logprob": -0.5, "bytes": [72, 105],
         "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}]}]})
    out = from_chat(answer, request(include=["message.output_text.logprobs"], top_logprobs=1),
                    Served())
    assert out["output"][0]["content"][0]["logprobs"] == [
        {"token": "Hi", "bytes": [72, 105], "logprob": -0.5,
         "top_logprobs": [{"token": "Hi", "bytes": [72, 105], "logprob": -0.5}]}]
    assert out["top_logprobs"] == 1
    assert from_chat(answer, request(), Served())["output"][0]["content"][0]["logprobs"] is None
