"""Assembling a turn's reply from vLLM's JSON or stream chunks."""

from nextstate.core.records import TurnRecord, assemble, untrainable


def _record(**kw):
    return TurnRecord(turn_id="t", endpoint=kw.pop("endpoint", "chat"), created_at=0.0,
                      request={}, **kw)


def test_stream_chunks_assemble_text_tokens_and_logprobs():
    chunks = [
        {"model": "m", "prompt_token_ids": [1, 2], "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "Hel"}, "token_ids": [7],
                      "logprobs": {"content": [{"logprob": -0.5}]}}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}, "token_ids": [8],
                      "logprobs": {"content": [{"logprob": -1.5}]}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"completion_tokens": 2}},
    ]
    out = assemble(_record(chunks=chunks))
    assert out.served_model == "m"
    assert out.prompt_token_ids == [1, 2]
    assert out.choices == [{"index": 0, "finish_reason": "stop", "token_ids": [7, 8],
                            "logprobs": [-0.5, -1.5],
                            "message": {"role": "assistant", "content": "Hello"}}]
    assert out.usage == {"completion_tokens": 2}


def test_streamed_tool_call_arguments_are_joined():
    chunks = [
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call_1", "function": {"name": "add", "arguments": '{"a"'}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": ": 1}"}}]}, "finish_reason": "tool_calls"}]},
    ]
    message = assemble(_record(chunks=chunks)).choices[0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [{"id": "call_1", "type": "function",
                                      "function": {"name": "add", "arguments": '{"a": 1}'}}]


def test_completions_keep_prompt_ids_from_the_choice():
    response = {"model": "m", "choices": [{"index": 0, "text": "x", "token_ids": [4],
                                           "prompt_token_ids": [9],
                                           "logprobs": {"token_logprobs": [-0.1]}}]}
    out = assemble(_record(endpoint="completions", response=response))
    assert out.prompt_token_ids == [9]
    assert out.choices[0]["text"] == "x"
    assert out.choices[0]["logprobs"] == [-0.1]


def test_whole_response_drops_vllm_null_extras_from_the_message():
    response = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi",
                                                     "refusal": None, "audio": None},
                             "token_ids": [1], "logprobs": None}]}
    out = assemble(_record(response=response))
    assert out.choices[0]["message"] == {"role": "assistant", "content": "hi"}


def _reply(ids=(7, 8), logprobs=(-0.5, -1.5), prompt=(1, 2), usage=None, more=()):
    choices = [{"index": 0, "token_ids": list(ids), "logprobs": {"content": [
        {"logprob": lp} for lp in logprobs]}, "message": {"role": "assistant"}}]
    choices += [{"index": i + 1, "token_ids": list(extra), "message": {"role": "assistant"}}
                for i, extra in enumerate(more)]
    sampled = sum(len(c["token_ids"]) for c in choices)
    response = {"choices": choices, "prompt_token_ids": list(prompt) or None,
                "usage": usage if usage is not None else {"prompt_tokens": len(prompt),
                                                          "completion_tokens": sampled}}
    return assemble(_record(response=response))


def test_tokens_matching_usage_are_trainable():
    assert untrainable(_reply()) is None
    # n>1: usage counts every choice's tokens.
    assert untrainable(_reply(more=[(3, 4, 5)])) is None


def test_tokens_a_client_library_dropped_or_miscounted_are_marked_untrainable():
    assert untrainable(_reply(prompt=())) == "no prompt token ids"
    assert untrainable(_reply(ids=(), logprobs=())) == "no completion token ids"
    assert untrainable(_reply(logprobs=())) == "0 sampler logprobs for 2 tokens"
    assert untrainable(_reply(usage={})) == "no usage to check the token counts against"
    # LiteLLM's own estimate of a stream's usage, not vLLM's.
    assert untrainable(_reply(usage={"prompt_tokens": 2, "completion_tokens": 1})) == (
        "token counts (2 prompt, 2 completion) differ from usage (2, 1)")
