"""A streamed Responses answer made from chat chunks, one chunk at a time."""

from __future__ import annotations

from nextstate.proxy.dialects.responses import Served
from nextstate.proxy.dialects.responses_stream import ResponsesStream
from tests.proxy.dialects.streams import call, chunk, end, role, sse_events, text


def run(chunks, **body):
    translator = ResponsesStream({"model": "toy", "input": "Hi", **body},
                                 Served(max_model_len=4096))
    per_chunk = [sse_events(translator.feed(c)) for c in chunks]
    return per_chunk, sse_events(translator.done())


def kinds(events):
    return [data["type"] for _, data in events]


def test_a_text_answer_streams_its_events_as_each_chunk_arrives():
    per_chunk, last = run([role(), text("He"), text("llo"), *end("length")])
    assert kinds(per_chunk[0]) == ["response.created", "response.in_progress"]
    assert kinds(per_chunk[1]) == ["response.output_item.added", "response.content_part.added",
                                   "response.output_text.delta"]
    assert kinds(per_chunk[2]) == ["response.output_text.delta"]
    assert kinds(last) == ["response.output_text.done", "response.content_part.done",
                           "response.output_item.done", "response.completed"]
    everything = [e for events in [*per_chunk, last] for e in events]
    assert [d["sequence_number"] for _, d in everything] == list(range(len(everything)))
    assert all(name == data["type"] for name, data in everything)
    final = last[-1][1]["response"]
    assert final["status"] == "incomplete" and final["usage"]["output_tokens"] == 5
    assert final["output"][0]["content"][0]["text"] == "Hello"
    assert final["max_output_tokens"] == 4096 - 7  # the prompt's length came with the usage


def test_text_then_two_tool_calls_are_three_items_in_order():
    per_chunk, last = run([role(), text("Checking."), call(0, "call_a", "weather"),
                           call(0, arguments='{"city": "Paris"}'), call(1, "call_b", "weather"),
                           call(1, arguments='{"city": "Rome"}'), *end("tool_calls")])
    events = [e for events in [*per_chunk, last] for e in events]
    added = [d["item"] for _, d in events if d["type"] == "response.output_item.added"]
    assert [(i["type"], i.get("call_id")) for i in added] == [
        ("message", None), ("function_call", "call_a"), ("function_call", "call_b")]
    done = [d for _, d in events if d["type"] == "response.function_call_arguments.done"]
    assert [(d["output_index"], d["arguments"]) for d in done] == [
        (1, '{"city": "Paris"}'), (2, '{"city": "Rome"}')]
    final = last[-1][1]["response"]
    assert [i["type"] for i in final["output"]] == ["message", "function_call", "function_call"]
    assert final["status"] == "completed"


def test_reasoning_is_its_own_item_before_the_text():
    _, last = run([role(), chunk({"reasoning": "think"}), text("Answer"), *end("stop")])
    final = last[-1][1]["response"]
    assert [i["type"] for i in final["output"]] == ["reasoning", "message"]
    assert final["output"][0]["content"] == [{"text": "think", "type": "reasoning_text"}]


def test_asked_logprobs_ride_on_the_text_deltas():
    lp = {"content": [{"token": "Hi", "logprob": -0.25, "bytes": [72, 105], "top_logprobs": []}]}
    piece = chunk({"content": "Hi"})
    piece["choices"][0]["logprobs"] = lp
    per_chunk, last = run([role(), piece, *end("stop")],
                          include=["message.output_text.logprobs"])
    delta = per_chunk[1][-1][1]
    assert delta["logprobs"] == [{"token": "Hi", "logprob": -0.25, "top_logprobs": []}]
    part = last[-1][1]["response"]["output"][0]["content"][0]
    assert part["logprobs"][0]["bytes"] == [72, 105]


def test_an_error_chunk_is_an_error_event_and_the_end():
    translator = ResponsesStream({"input": "Hi"}, Served())
    translator.feed(role())
    events = sse_events(translator.feed({"error": {"message": "boom", "code": 500}}))
    assert [(n, d["type"], d["message"]) for n, d in events] == [("error", "error", "boom")]
    assert translator.done() == b""


def test_text_written_inside_a_tool_call_follows_the_calls_item():
    per_chunk, last = run([role(), call(0, "call_a", "weather"), call(0, arguments='{"city": '),
                           text("(aside)"), call(0, arguments='"Paris"}'), *end("tool_calls")])
    assert per_chunk[3] == []  # held, not sent inside the call's item
    final = last[-1][1]["response"]
    assert [i["type"] for i in final["output"]] == ["function_call", "message"]
    assert final["output"][0]["arguments"] == '{"city": "Paris"}'
    assert final["output"][1]["content"][0]["text"] == "(aside)"
