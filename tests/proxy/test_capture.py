"""Token capture: what the proxy adds upstream and strips from replies."""

import pytest

from nextstate.proxy.capture import (
    Asked,
    add_capture,
    is_usage_chunk,
    recomputable,
    strip_response,
)


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


# -- sampler logprobs left to the learner (settings.sampler_logprobs = "recompute") ---------

PLAIN = {"messages": [{"role": "user", "content": "hi"}], "temperature": 1, "seed": 3,
         "max_tokens": 8, "stop": ["\n"], "tools": [{"type": "function"}],
         "tool_choice": "auto", "ignore_eos": True, "top_p": 1.0}


@pytest.mark.parametrize("change", [
    {"temperature": None}, {"temperature": 0.7}, {"temperature": True}, {"top_p": 0.9},
    {"top_k": 20}, {"min_p": 0.1}, {"presence_penalty": 0.5}, {"repetition_penalty": 1.1},
    {"logit_bias": {"5": 3}}, {"min_tokens": 4}, {"tool_choice": "required"},
    {"tool_choice": {"type": "function", "function": {"name": "f"}}},
    {"response_format": {"type": "json_object"}}, {"structured_outputs": {"regex": "a+"}},
    {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]},
])
def test_only_plain_sampling_is_recomputable(change):
    assert recomputable(PLAIN) and recomputable({**PLAIN, "temperature": 0})
    assert recomputable({**PLAIN, "response_format": {"type": "text"}})
    changed = {k: v for k, v in {**PLAIN, **change}.items() if v is not None}
    assert not recomputable(changed)


def test_recompute_leaves_logprobs_out_of_plain_requests_only():
    body = {**PLAIN, "stream": True}
    asked = add_capture(body, "chat", recompute=True)
    assert "logprobs" not in body and body["return_token_ids"] is True
    assert not asked.sampler_logprobs
    shaped = {**PLAIN, "temperature": 0.7}
    assert add_capture(shaped, "chat", recompute=True).sampler_logprobs
    assert shaped["logprobs"] is True
    plain = dict(PLAIN)
    assert add_capture(plain, "chat").sampler_logprobs and plain["logprobs"] is True


def test_logprobs_a_client_asked_for_are_still_passed_on_when_recomputing():
    body = {**PLAIN, "logprobs": True, "return_token_ids": True}
    asked = add_capture(body, "chat", recompute=True)
    assert asked.sampler_logprobs and asked.everything and body["logprobs"] is True


def test_nothing_is_stripped_that_was_not_added():
    asked = add_capture({**PLAIN, "return_token_ids": True}, "chat", recompute=True)
    assert asked.everything  # vLLM's own null logprobs go to the client as they are
    obj = {"choices": [{"index": 0, "token_ids": [5], "logprobs": None}]}
    assert strip_response(obj, Asked(False, False, True, sampler_logprobs=False),
                          "chat") == {"choices": [{"index": 0, "token_ids": None,
                                                   "logprobs": None}]}
