"""Token capture: what the proxy adds upstream and strips from replies."""

from nextstate.proxy.capture import Asked, add_capture, is_usage_chunk, strip_response


def test_capture_is_added_for_chat_and_remembers_what_client_asked():
    body = {"messages": [], "stream": True}
    asked = add_capture(body, "chat")
    assert asked == Asked(token_ids=False, logprobs=False, usage_chunk=False)
    assert body["return_token_ids"] is True
    assert body["logprobs"] is True
    assert body["stream_options"] == {"include_usage": True}


def test_client_options_are_kept_and_not_stripped():
    body = {"messages": [], "stream": True, "logprobs": True, "top_logprobs": 3,
            "return_token_ids": True, "stream_options": {"include_usage": True}}
    asked = add_capture(body, "chat")
    assert asked.everything
    assert body["top_logprobs"] == 3


def test_completions_use_legacy_logprobs_zero():
    body = {"prompt": "hi"}
    asked = add_capture(body, "completions")
    assert body["logprobs"] == 0
    assert not asked.logprobs
    assert asked.usage_chunk  # non-streaming responses always carry usage


def test_strip_resets_fields_to_null_and_keeps_the_original():
    obj = {"prompt_token_ids": [1], "choices": [
        {"index": 0, "token_ids": [5], "logprobs": {"content": []}, "prompt_token_ids": [1]}]}
    out = strip_response(obj, Asked(False, False, True), "chat")
    assert out == {"prompt_token_ids": None, "choices": [
        {"index": 0, "token_ids": None, "logprobs": None, "prompt_token_ids": None}]}
    assert obj["choices"][0]["token_ids"] == [5]  # the record is untouched


def test_strip_does_not_add_keys_vllm_did_not_send():
    out = strip_response({"choices": [{"index": 0, "delta": {}}]}, Asked(False, False, False),
                         "chat")
    assert out == {"choices": [{"index": 0, "delta": {}}]}


def test_usage_chunk_is_recognised():
    assert is_usage_chunk({"choices": [], "usage": {}})
    assert not is_usage_chunk({"choices": [{}], "usage": {}})
