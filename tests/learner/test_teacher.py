"""Teacher prompts and teacher logprobs, against a vLLM-shaped fake."""

import httpx
import orjson
import pytest

from nextstate.learner.teacher import (
    HINT_MARKER,
    Teacher,
    TeacherError,
    completion_logprobs,
    with_hint,
)


def test_hint_is_appended_to_the_last_user_message_only():
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "tool", "content": "t"}]
    out = with_hint(messages, "Be brief.")
    assert out[2]["content"] == "c\n\n[user's hint / instruction]\nBe brief."
    assert out[0]["content"] == "a"
    assert messages[2]["content"] == "c"  # the turn's own request is untouched


def test_hint_is_added_as_a_text_part_to_list_content():
    out = with_hint([{"role": "user", "content": [{"type": "text", "text": "q"}]}], "h")
    assert out[0]["content"][-1] == {"type": "text", "text": HINT_MARKER + "h"}


def test_completion_logprobs_are_picked_by_position_and_token():
    scored = [None, {"5": {"logprob": -1.0}}, {"7": {"logprob": -0.5}},
              {"9": {"logprob": -2.0}, "3": {"logprob": -0.1}}]
    assert completion_logprobs(scored, [7, 9], prompt_len=2) == [-0.5, -2.0]
    with pytest.raises(TeacherError):
        completion_logprobs(scored, [7, 8], prompt_len=2)


async def test_teacher_tokenizes_the_hinted_prompt_and_scores_the_recorded_tokens():
    seen = []

    def vllm(request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        seen.append((request.url.path, body))
        if request.url.path == "/tokenize":
            return httpx.Response(200, json={"tokens": [1, 2, 3]})
        return httpx.Response(200, json={"choices": [{"prompt_logprobs": [None] + [
            {str(t): {"logprob": -float(i)}} for i, t in enumerate(body["prompt"][1:], 1)]}]})

    teacher = Teacher("http://vllm", "base", client=httpx.AsyncClient(
        base_url="http://vllm", transport=httpx.MockTransport(vllm)))
    turn = {"endpoint": "chat", "request": {"messages": [{"role": "user", "content": "q"}],
                                             "tools": [{"type": "function"}]},
            "prompt_token_ids": [1, 2], "completion_token_ids": [8, 9]}
    assert await teacher.logprobs(turn, "hint") == [-3.0, -4.0]
    path, body = seen[0]
    assert path == "/tokenize" and body["tools"] == [{"type": "function"}]
    assert body["messages"][0]["content"].endswith(HINT_MARKER + "hint")
    assert seen[1][1]["prompt"] == [1, 2, 3, 8, 9]
    # Without a hint the recorded prompt ids are used as they are.
    assert await teacher.logprobs(turn, None) == [-2.0, -3.0]
    assert seen[-1][1]["prompt"] == [1, 2, 8, 9]
    await teacher.close()
