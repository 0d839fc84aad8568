"""The LLM judge with a fake model: prompts, votes, hints, retries, failures (learner.llm_judge)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import types
from collections import deque
from typing import Any

import pytest

from nextstate.learner.judgment import Judge, JudgeError
from nextstate.learner.llm_judge import (
    HINT_SYSTEM,
    LLMJudge,
    Messages,
    evaluative_prompt,
    hint_prompt,
)

CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Pariss"}'}}


def weather_turn(**extra: Any) -> dict[str, Any]:
    turn = {
        "turn_id": "t1", "endpoint": "chat", "status": "ok",
        "request": {"messages": [
            {"role": "system", "content": "You are a weather assistant."},
            {"role": "user", "content": "What's the weather in Paris?"}]},
        "response": {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None, "tool_calls": [CALL]}}]},
        "next_state": [{"role": "tool", "tool_call_id": "call_1", "status": "error",
                        "content": "Error: unknown city 'Pariss'"}],
        "next_state_kind": "tool", "next_state_status": "paired", "feedback": [],
    }
    turn.update(extra)
    return turn


def boxed(vote: int) -> str:
    return f"The tool rejected the misspelt city.\n\\boxed{{{vote}}}"


def hinted(hint: str) -> str:
    return f"Reasoning.\n\\boxed{{1}}\n[HINT_START]{hint}[HINT_END]"


class Scripted:
    """A fake model: answers each prompt kind from its own script, counting calls."""

    def __init__(self, evaluative: list[str | BaseException],
                 hints: list[str | BaseException] | None = None) -> None:
        self.scripts = {"eval": deque(evaluative), "hint": deque(hints or [])}
        self.calls = {"eval": 0, "hint": 0}

    async def __call__(self, messages: Messages) -> str:
        kind = "hint" if messages[0]["content"] == HINT_SYSTEM else "eval"
        self.calls[kind] += 1
        script = self.scripts[kind]
        answer = script.popleft() if script else "The reply was fine. \\boxed{-1}"
        if isinstance(answer, BaseException):
            raise answer
        return answer


def judge_with(complete: Any, **kwargs: Any) -> LLMJudge:
    kwargs.setdefault("backoff", 0.0)
    return LLMJudge("openai/gpt-4o-mini", complete=complete, **kwargs)


def test_the_evaluative_prompt_shows_the_reply_tool_calls_and_next_state() -> None:
    system, user = evaluative_prompt(weather_turn())
    assert system["role"] == "system" and "\\boxed{-1}" in system["content"]
    assert "not a new instruction" in system["content"]
    text = user["content"]
    assert text.index("## Conversation so far") < text.index("## The assistant's reply") \
        < text.index("## Next state")
    assert "What's the weather in Paris?" in text
    assert 'calls tool get_weather({"city": "Pariss"})' in text
    assert "[tool result call_1, status: error]\nError: unknown city 'Pariss'" in text


def test_the_hint_prompt_asks_for_a_boxed_hint_block() -> None:
    system, user = hint_prompt(weather_turn())
    assert "[HINT_START]" in system["content"] and "[HINT_END]" in system["content"]
    assert "\\boxed{1}" in system["content"] and "\\boxed{-1}" in system["content"]
    assert "Error: unknown city 'Pariss'" in user["content"]


def test_prompts_keep_long_conversations_short() -> None:
    history = [{"role": "user" if i % 2 else "assistant", "content": f"message {i} " * 400}
               for i in range(20)]
    turn = weather_turn(request={"messages": history})
    text = evaluative_prompt(turn)[1]["content"]
    assert "(14 earlier messages not shown)" in text and "message 3 " not in text
    assert "characters cut" in text and len(text) < 15_000


def test_prompts_read_completions_turns() -> None:
    turn = weather_turn(request={"prompt": "Q: 2+2?\nA:"},
                        response={"choices": [{"index": 0, "text": " 5"}]},
                        next_state=[{"role": "user", "content": "\nQ: wrong, try again"}])
    text = evaluative_prompt(turn)[1]["content"]
    assert "[prompt]\nQ: 2+2?" in text and "[assistant]\n5" in text and "try again" in text


async def test_the_majority_of_votes_is_the_score() -> None:
    fake = Scripted([boxed(-1), boxed(1), boxed(-1)])
    judgment = await judge_with(fake).judge(weather_turn())
    assert judgment.score == -1 and judgment.votes == (-1, 1, -1)
    assert judgment.texts == (boxed(-1), boxed(1), boxed(-1))
    assert (judgment.judge, judgment.prompt_version, judgment.source) == (
        "llm:openai/gpt-4o-mini", "prm-1", "judge")
    assert fake.calls == {"eval": 3, "hint": 3}


async def test_a_tie_scores_zero() -> None:
    judgment = await judge_with(Scripted([boxed(1), boxed(-1), boxed(0)])).judge(weather_turn())
    assert (judgment.score, judgment.votes) == (0, (1, -1, 0))


async def test_malformed_answers_are_votes_of_none() -> None:
    fake = Scripted(["I think it went well.", boxed(1), "\\boxed{maybe}"])
    judgment = await judge_with(fake).judge(weather_turn())
    assert (judgment.score, judgment.votes) == (1, (None, 1, None))


async def test_all_malformed_answers_raise() -> None:
    fake = Scripted(["no box", "\\boxed{2}", "\\boxed{-"])
    with pytest.raises(JudgeError, match="all 3 evaluative answers were malformed"):
        await judge_with(fake).judge(weather_turn())


async def test_hints_are_selected_from_the_hint_answers() -> None:
    fake = Scripted([boxed(-1)] * 5, [
        hinted("Check the spelling of the city before calling get_weather: Paris."),
        hinted("Spell it right."),  # too short to be a hint (11 characters is the limit)
        hinted("Check the spelling of the city before calling get_weather: Paris."),
        "Nothing to learn here. \\boxed{-1}",
        hinted("Call get_weather with city='Paris'."),
    ])
    judgment = await judge_with(fake, votes=5).judge(weather_turn())
    assert judgment.hints == ("Check the spelling of the city before calling get_weather: Paris.",
                              "Call get_weather with city='Paris'.", "Spell it right.")
    assert len(judgment.extra["hint_texts"]) == 5


async def test_explicit_feedback_outranks_the_vote_and_its_hint_comes_first() -> None:
    turn = weather_turn(feedback=[{"score": 1, "hint": "Ask which Paris is meant.",
                                   "source": "endpoint", "created_at": 1.0}])
    fake = Scripted([boxed(-1)] * 3, [hinted("Spell city names as the user wrote them.")])
    judgment = await judge_with(fake).judge(turn)
    assert (judgment.score, judgment.source) == (1, "feedback")
    assert judgment.votes == (-1, -1, -1) and judgment.extra["judge_score"] == -1
    assert judgment.hints == ("Ask which Paris is meant.",
                              "Spell city names as the user wrote them.")


async def test_feedback_stands_even_when_the_judge_is_down() -> None:
    turn = weather_turn(feedback=[{"score": -1, "hint": None}])
    fake = Scripted([ConnectionError("refused")] * 99, [ConnectionError("refused")] * 99)
    judgment = await judge_with(fake, retries=0).judge(turn)
    assert (judgment.score, judgment.source, judgment.votes) == (-1, "feedback", ())
    assert len(judgment.extra["errors"]) == 6


async def test_failed_calls_are_retried_with_backoff() -> None:
    fake = Scripted([TimeoutError(), ConnectionError("reset"), boxed(-1), boxed(-1), boxed(1)])
    judgment = await judge_with(fake, retries=3, backoff=0.01).judge(weather_turn())
    # Two of the three calls failed once each and succeeded on their second attempt.
    assert fake.calls["eval"] == 5
    assert (judgment.votes.count(-1), judgment.votes.count(1)) == (2, 1)
    assert "errors" not in judgment.extra


async def test_a_judge_that_always_fails_raises_after_all_retries() -> None:
    fake = Scripted([ConnectionError("connection refused")] * 99,
                    [ConnectionError("connection refused")] * 99)
    with pytest.raises(JudgeError, match=r"every judge call failed: ConnectionError: "
                                         r"connection refused \(3 attempts\)"):
        await judge_with(fake, retries=2).judge(weather_turn())
    assert fake.calls == {"eval": 9, "hint": 9}  # (1 + 2 retries) x 3 votes, per prompt


async def test_a_slow_judge_times_out() -> None:
    async def slow(messages: Messages) -> str:
        await asyncio.sleep(5)
        return boxed(1)

    with pytest.raises(JudgeError, match=r"timed out after 0.05s \(2 attempts\)"):
        await judge_with(slow, timeout=0.05, retries=1).judge(weather_turn())


async def test_hint_calls_failing_alone_do_not_fail_the_judgment() -> None:
    fake = Scripted([boxed(-1)] * 3, [RuntimeError("overloaded")] * 99)
    judgment = await judge_with(fake, retries=0).judge(weather_turn())
    assert judgment.score == -1 and judgment.hints == ()
    assert judgment.extra["errors"] == ["RuntimeError: overloaded (1 attempt)"] * 3


async def test_evaluative_calls_failing_alone_raise() -> None:
    fake = Scripted([RuntimeError("overloaded")] * 99, [hinted("Spell Paris correctly.")])
    with pytest.raises(JudgeError, match="every evaluative judge call failed"):
        await judge_with(fake, retries=0).judge(weather_turn())


class Unauthorized(Exception):
    status_code = 401


async def test_client_errors_are_not_retried() -> None:
    fake = Scripted([Unauthorized("bad key")] * 99, [Unauthorized("bad key")] * 99)
    with pytest.raises(JudgeError, match="Unauthorized: bad key"):
        await judge_with(fake, retries=3).judge(weather_turn())
    assert fake.calls == {"eval": 3, "hint": 3}


async def test_concurrent_calls_are_bounded() -> None:
    running = peak = 0

    async def counting(messages: Messages) -> str:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        return boxed(1)

    judge = judge_with(counting, votes=5, max_concurrency=2)
    await asyncio.gather(*(judge.judge(weather_turn()) for _ in range(3)))
    assert peak == 2


async def test_a_turn_without_next_state_makes_no_calls() -> None:
    fake = Scripted([])
    judgment = await judge_with(fake).judge(weather_turn(next_state=None,
                                                         next_state_status="none"))
    assert (judgment.score, judgment.votes, fake.calls["eval"]) == (0, (), 0)
    with pytest.raises(JudgeError, match="pending"):
        await judge_with(fake).judge(weather_turn(next_state=None, next_state_status="pending"))


async def test_litellm_is_called_with_the_judge_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []

    async def acompletion(**kwargs: Any) -> Any:
        seen.append(kwargs)
        message = types.SimpleNamespace(content=boxed(1))
        return types.SimpleNamespace(choices=[types.SimpleNamespace(message=message)])

    monkeypatch.setitem(sys.modules, "litellm", types.SimpleNamespace(acompletion=acompletion))
    judge = LLMJudge("hosted_vllm/nextstate-toy", api_base="http://127.0.0.1:8000/v1",
                     votes=1, temperature=0.6, max_tokens=256)
    judgment = await judge.judge(weather_turn())
    assert judgment.score == 1 and judge.name == "llm:hosted_vllm/nextstate-toy"
    assert {(k["model"], k["api_base"], k["temperature"], k["max_tokens"]) for k in seen} == {
        ("hosted_vllm/nextstate-toy", "http://127.0.0.1:8000/v1", 0.6, 256)}


def test_importing_the_module_does_not_import_litellm() -> None:
    code = ("import sys, nextstate.learner.llm_judge; "
            "assert 'litellm' not in sys.modules, 'litellm imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_llm_judge_satisfies_the_protocol() -> None:
    judge: Judge = LLMJudge("openai/gpt-4o-mini")
    assert judge.prompt_version == "prm-1"


def test_the_backends_own_model_as_judge_is_asked_with_the_backends_key(monkeypatch) -> None:
    from nextstate.learner.process import LearnerConfig, make_judge

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123")  # the hosted judge's own key

    config = LearnerConfig(store_url="sqlite://", backends=("http://vllm:8000",),
                           base_model="toy", judge="llm", backend_api_key="k")
    judge = make_judge(config)
    assert (judge.api_base, judge.api_key) == ("http://vllm:8000/v1", "k")
    other = make_judge(LearnerConfig(store_url="sqlite://", backends=("http://vllm:8000",),
                                     base_model="toy", judge="llm", backend_api_key="k",
                                     judge_model="openai/gpt-4o-mini"))
    assert other.api_key is None  # another provider never gets vLLM's key


@pytest.mark.parametrize(("model", "api_base", "api_key", "environ", "refused"), [
    ("openai/gpt-4o-mini", None, None, {}, "needs OPENAI_API_KEY in the environment"),
    ("openai/gpt-4o-mini", None, None, {"OPENAI_API_KEY": "sk-..."}, "looks like a placeholder"),
    ("openai/gpt-4o-mini", None, "changeme", {}, "looks like a placeholder"),
    ("openai/gpt-4o-mini", None, None, {"OPENAI_API_KEY": "sk-real-0123"}, None),
    ("hosted_vllm/toy", "http://127.0.0.1:8000/v1", None, {}, None),  # a vLLM of one's own
])
def test_a_missing_or_placeholder_judge_key_is_refused_at_start(
        model, api_base, api_key, environ, refused, monkeypatch) -> None:
    from nextstate.learner.llm_judge import JudgeConfigError, check_key

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)

    if refused is None:
        check_key(model, api_base, api_key, environ)
        return
    with pytest.raises(JudgeConfigError, match=refused) as caught:
        check_key(model, api_base, api_key, environ)
    assert "--judge rules" in str(caught.value)
