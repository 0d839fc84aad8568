"""previous_response_id: the proxy expands the whole conversation from what it kept."""

from __future__ import annotations

import pytest

from nextstate.proxy.dialects import responses
from nextstate.proxy.dialects.conversation import Kept, expand, keep
from nextstate.proxy.errors import NotFound


def served(body: dict[str, object], output: list[dict[str, object]]) -> dict[str, object]:
    return {"id": "resp_x", "object": "response", "output": output, **body}


CALL = {"type": "function_call", "call_id": "call_1", "name": "weather",
        "arguments": '{"city": "Paris"}', "id": "fc_1", "status": "completed"}


def test_a_chain_expands_to_every_item_the_model_saw_in_order():
    kept: dict[str, Kept] = {}
    first = {"input": "Weather in Paris?", "instructions": "Be terse."}
    kept["resp_1"] = keep(expand(first, kept.get), served(first, [CALL]))
    second = {"previous_response_id": "resp_1", "instructions": "Be terser.",
              "input": [{"type": "function_call_output", "call_id": "call_1", "output": "18C"}]}
    expanded = expand(second, kept.get)
    kept["resp_2"] = keep(expanded, served(second, [
        {"type": "message", "role": "assistant", "id": "msg_2", "status": "completed",
         "content": [{"type": "output_text", "text": "18C.", "annotations": []}]}]))
    third = expand({"previous_response_id": "resp_2", "input": "And Rome?"}, kept.get)
    assert [i.get("type") for i in third["input"]] == [
        "message", "function_call", "function_call_output", "message", "message"]
    chat = responses.to_chat(third)
    assert [m["role"] for m in chat["messages"]] == ["user", "assistant", "tool", "assistant",
                                                     "user"]
    assert chat["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
    # Instructions apply to their own request only.
    assert responses.to_chat(expanded)["messages"][0] == {"role": "system",
                                                           "content": "Be terser."}
    assert third["previous_response_id"] == "resp_2"  # echoed by the response


def test_without_previous_response_id_the_body_is_untouched():
    body = {"input": "Hi"}
    assert expand(body, lambda _: None) is body


def test_an_unknown_previous_response_is_a_404():
    with pytest.raises(NotFound) as caught:
        expand({"input": "Hi", "previous_response_id": "resp_gone"}, lambda _: None)
    assert caught.value.status == 404 and caught.value.param == "previous_response_id"
