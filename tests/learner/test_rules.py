"""The offline rules judge on real-looking conversations (learner.rules).

Each session is a recorded turn in the export format: what the user asked, what the
assistant replied, and what came next. The expected score and hint are the ones a person
reading the exchange would give.
"""

from __future__ import annotations

from typing import Any

import pytest

from nextstate.learner.judgment import Judge, JudgeError
from nextstate.learner.rules import RuleCues, RulesJudge, explicit_feedback

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def chat_turn(asked: str, replied: str, then: str | None = None, *,
              tools: list[dict[str, Any]] | None = None, tool_calls: Any = None,
              feedback: list[dict[str, Any]] | None = None,
              status: str | None = None) -> dict[str, Any]:
    """A turn as `nextstate export` writes it (the fields the judges read)."""
    state = [{"role": "user", "content": then}] if then is not None else []
    state = (tools or []) + state
    reply: dict[str, Any] = {"role": "assistant", "content": replied}
    if tool_calls:
        reply["tool_calls"] = tool_calls
    return {
        "turn_id": "t1", "session_id": "s1", "turn_index": 0, "turn_type": "main",
        "endpoint": "chat", "status": "ok",
        "request": {"model": "nextstate-toy",
                    "messages": [SYSTEM, {"role": "user", "content": asked}]},
        "response": {"choices": [{"index": 0, "message": reply, "finish_reason": "stop"}]},
        "next_state": state or None,
        "next_state_kind": ("tool" if tools else "user") if state else None,
        "next_state_status": status or ("paired" if state else "none"),
        "feedback": feedback or [],
    }


CAPITAL = ("What's the capital of Australia?", "The capital of Australia is Sydney.")
SUMMARY = ("Summarise this article in two sentences: ...",
           "The article describes the history of the printing press, starting with ...")

JUDGE = RulesJudge()


async def judged(turn: dict[str, Any]) -> tuple[int, tuple[str, ...]]:
    judgment = await JUDGE.judge(turn)
    assert judgment.judge == "rules" and judgment.prompt_version == "rules-3"
    assert judgment.votes == (judgment.score,) and len(judgment.texts) == 1
    return judgment.score, judgment.hints


@pytest.mark.parametrize("correction", [
    "No, it's Canberra. Sydney is just the biggest city.",
    "That's wrong, the capital is Canberra.",
    "thats not right - it's canberra",
    "Incorrect. Look it up: Canberra.",
    "Hmm, no. Canberra has been the capital since 1913.",
    "Thanks, but that's wrong: it is Canberra.",  # thanks do not soften a correction
])
async def test_a_correction_is_negative_and_becomes_the_hint(correction: str) -> None:
    assert await judged(chat_turn(*CAPITAL, correction)) == (-1, (correction,))


@pytest.mark.parametrize("complaint", [
    "Way too long. I said two sentences.",
    "This is too formal for a Slack message, make it casual.",
    "Can you try again? You missed the second half of the article.",
    "Please fix the summary, it ignores the conclusion.",
    "I meant the article's argument, not its history.",
    "Could you make it shorter?",
    "It still doesn't work, I get the same 404.",
])
async def test_complaints_and_redo_requests_are_negative(complaint: str) -> None:
    # A change request is feedback on the reply, not a new instruction.
    assert await judged(chat_turn(*SUMMARY, complaint)) == (-1, (complaint,))


@pytest.mark.parametrize("approval", [
    "Thanks, that's exactly it!",
    "Perfect, that works.",
    "great, thank you",
    "Got it. Appreciate it!",
    "No worries about the delay, thanks!",  # "no worries" is not a correction
    "No problem, that's correct.",
])
async def test_thanks_and_approval_are_positive(approval: str) -> None:
    assert await judged(chat_turn(*SUMMARY, approval)) == (1, ())


@pytest.mark.parametrize("next_request", [
    "Now translate the summary into German.",
    "Next question: how do I reverse a list in Python?",
    "I know the printing press part already. Who financed Gutenberg?",  # "know" is not "no"
    "Did the article mention anything about paper prices?",
    "Is there no mention of Venice?",  # "no" inside a question is not a correction
])
async def test_a_user_moving_on_to_a_new_request_is_positive(next_request: str) -> None:
    assert await judged(chat_turn(*SUMMARY, next_request)) == (1, ())


async def test_moving_on_scores_what_the_judge_is_configured_with() -> None:
    judgment = await RulesJudge(moved_on=0).judge(
        chat_turn(*SUMMARY, "Now translate the summary into German."))
    assert judgment.score == 0 and judgment.extra["signal"] == "moved_on"


async def test_asking_the_same_question_again_in_other_words_is_negative() -> None:
    turn = chat_turn("What is the population of Tokyo?",
                     "Tokyo is the capital of Japan and one of its largest cities.",
                     "What's the population of Tokyo, Japan?")
    judgment = await JUDGE.judge(turn)
    assert judgment.score == -1 and judgment.extra["signal"] == "rephrase"
    assert judgment.hints == ("What's the population of Tokyo, Japan?",)
    assert "same again" in judgment.texts[0]


async def test_a_related_but_different_question_is_not_a_rephrasing() -> None:
    turn = chat_turn("What is the population of Tokyo?", "About 14 million (2023).",
                     "What is the population of Osaka?")
    assert await judged(turn) == (1, ())


@pytest.mark.parametrize("reply", ["ok", "Okay.", "hmm", "Hmm...", "ok, I see", "yes", "   "])
async def test_a_bare_acknowledgement_is_ambiguous(reply: str) -> None:
    # "ok" alone says nothing about the reply: acceptance after a good answer, resignation
    # after a bad one. It scores 0; "ok thanks" or "ok, now ..." are read as usual.
    assert await judged(chat_turn(*SUMMARY, reply)) == (0, ())
    assert await judged(chat_turn(*SUMMARY, f"{reply.strip()} thanks!")) == (1, ())


CALL = [{"id": "call_1", "type": "function",
         "function": {"name": "run", "arguments": '{"command": "python make_report.py"}'}}]


async def test_a_tool_that_exits_with_code_zero_is_a_success() -> None:
    # The output mentions "error:" (the report counts log errors) but the exit code rules.
    turn = chat_turn("Generate the weekly report.", "", tool_calls=CALL, tools=[
        {"role": "tool", "tool_call_id": "call_1",
         "content": "exit code: 0\nreport.md written; lines matching 'error:' in logs: 3"}])
    judgment = await JUDGE.judge(turn)
    assert (judgment.score, judgment.hints) == (1, ())
    assert judgment.extra["signal"] == "tool_ok"


async def test_a_tool_traceback_is_evidence_against_the_call() -> None:
    turn = chat_turn("Generate the weekly report.", "", tool_calls=CALL, tools=[
        {"role": "tool", "tool_call_id": "call_1", "content": (
            "Traceback (most recent call last):\n  File \"make_report.py\", line 3\n"
            "ModuleNotFoundError: No module named 'pandas'")}])
    judgment = await JUDGE.judge(turn)
    assert judgment.score == -1 and "traceback" in judgment.texts[0]


@pytest.mark.parametrize(("tool", "why"), [
    ({"role": "tool", "content": "exit code: 2\nls: cannot access 'out/': No such file"},
     "code 2"),
    ({"role": "tool", "content": "exit code: timeout"}, "code timeout"),
    ({"role": "tool", "content": "Error: ValueError: city 'Pariss' not found",
      "status": "error"}, "status 'error'"),
    ({"role": "tool", "content": "fatal: not a git repository"}, "fatal:"),
])
async def test_tool_errors_and_non_zero_exit_codes_are_negative(tool: dict[str, Any],
                                                                why: str) -> None:
    judgment = await JUDGE.judge(chat_turn("Do it.", "", tool_calls=CALL, tools=[tool]))
    assert judgment.score == -1 and why in judgment.texts[0]


async def test_a_plain_tool_result_is_a_success() -> None:
    turn = chat_turn("Weather in Paris?", "", tool_calls=CALL, tools=[
        {"role": "tool", "content": '{"city": "Paris", "temp_c": 21, "sky": "clear"}'}])
    assert await judged(turn) == (1, ())


async def test_a_user_correction_after_a_successful_tool_outranks_the_tool() -> None:
    turn = chat_turn("Weather in Paris?", "", tool_calls=CALL, then="I meant Paris, Texas.",
                     tools=[{"role": "tool", "content": '{"city": "Paris", "temp_c": 21}'}])
    assert await judged(turn) == (-1, ("I meant Paris, Texas.",))


async def test_explicit_feedback_overrides_the_cues() -> None:
    turn = chat_turn(*CAPITAL, "Thanks!", feedback=[
        {"id": "f1", "score": -1, "hint": None, "source": "endpoint", "created_at": 10.0}])
    judgment = await JUDGE.judge(turn)
    assert (judgment.score, judgment.source, judgment.votes) == (-1, "feedback", (1,))
    assert "explicit feedback -1" in judgment.texts[0]
    assert judgment.hints == ()  # "Thanks!" is no hint


async def test_the_latest_feedback_wins() -> None:
    turn = chat_turn(*CAPITAL, "No, it's Canberra.", feedback=[
        {"id": "f2", "score": 1, "hint": None, "source": "endpoint", "created_at": 20.0},
        {"id": "f1", "score": -1, "hint": "Canberra.", "source": "header", "created_at": 10.0},
    ])
    judgment = await JUDGE.judge(turn)
    assert (judgment.score, judgment.source) == (1, "feedback")
    assert judgment.hints == ("Canberra.",)  # the latest hint given is still kept


async def test_a_feedback_hint_outranks_the_users_text() -> None:
    correction = "Too long, nobody reads that much in a chat."
    turn = chat_turn(*SUMMARY, correction, feedback=[
        {"id": "f1", "score": -1, "hint": "Answer in at most two sentences.",
         "source": "adapter:openai", "created_at": 5.0}])
    judgment = await JUDGE.judge(turn)
    assert judgment.score == -1
    assert judgment.hints == ("Answer in at most two sentences.", correction)


async def test_no_next_state_and_no_feedback_scores_zero() -> None:
    judgment = await JUDGE.judge(chat_turn(*CAPITAL))
    assert (judgment.score, judgment.hints, judgment.source) == (0, (), "judge")
    assert judgment.texts == ("no next state",)


async def test_feedback_on_a_turn_without_next_state_still_counts() -> None:
    turn = chat_turn(*CAPITAL, feedback=[{"score": -1, "hint": "The capital is Canberra."}])
    judgment = await JUDGE.judge(turn)
    assert (judgment.score, judgment.hints) == (-1, ("The capital is Canberra.",))


async def test_a_pending_next_state_is_not_judged_yet() -> None:
    with pytest.raises(JudgeError, match="pending"):
        await JUDGE.judge(chat_turn(*CAPITAL, status="pending"))


async def test_custom_cues_replace_the_defaults() -> None:
    cues = RuleCues(negative=("falsch",), negative_openers=("nein",), positive=("danke",))
    judge = RulesJudge(cues)
    assert (await judge.judge(chat_turn(*CAPITAL, "Nein, Canberra!"))).score == -1
    assert (await judge.judge(chat_turn(*CAPITAL, "Das ist falsch."))).score == -1
    assert (await judge.judge(chat_turn(*CAPITAL, "Super, danke"))).score == 1


def test_short_corrections_are_not_hints() -> None:
    judgment = JUDGE.judge_now(chat_turn(*CAPITAL, "No."))
    assert (judgment.score, judgment.hints) == (-1, ())


def test_explicit_feedback_reads_scores_and_ignores_broken_entries() -> None:
    assert explicit_feedback({"feedback": []}) is None
    fb = explicit_feedback({"feedback": [{"score": "+1"}, {"score": "oops", "hint": "x"}]})
    assert fb is not None and (fb.score, fb.hint) == (1, None)


def test_the_rules_judge_satisfies_the_protocol() -> None:
    judge: Judge = RulesJudge()
    assert judge.name == "rules"


@pytest.mark.parametrize("correction", [
    "Could you make the summary a little punchier?",
    "I'd prefer bullet points.",
    "Next time, start with the conclusion.",
    "Would you mind dropping the jargon?",
    "It should be about the argument, not the history.",
    "Way too dry for a newsletter.",
    "A bit more about the sources, please.",
    "I don't get how the second sentence follows.",
    "Are you sure the press came before the paper mill?",
    "Less academic, please.",
    "Drop the dates and keep it to two sentences.",
    "My readers are kids, so talk to me like a friend would.",
    "Almost, the second sentence is off.",
])
async def test_requests_to_change_the_reply_are_corrections(correction: str) -> None:
    # People rarely say "wrong": a wish, a request to change the reply or a doubt about it
    # is a correction too, and its words are the hint.
    assert await judged(chat_turn(*SUMMARY, correction)) == (-1, (correction,))


@pytest.mark.parametrize("new_request", [
    "Could you summarise the next article as well?",
    "Can you write another one about the steam engine?",
    "Me too, I had never heard of it. Who was Fust?",
    "What did the printing press cost?",
])
async def test_a_new_request_worded_like_a_change_is_still_moving_on(new_request: str) -> None:
    assert await judged(chat_turn(*SUMMARY, new_request)) == (1, ())


@pytest.mark.parametrize("approval", [
    "Wonderful, that's the one.", "Lovely, much better.", "That makes sense now, cheers.",
    "Superb, it did the trick.",
])
async def test_more_ways_of_saying_thanks_are_positive(approval: str) -> None:
    assert await judged(chat_turn(*SUMMARY, approval)) == (1, ())


SCREEN = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


def screenshot_turn(*state: dict[str, Any], feedback: list[dict[str, Any]] | None = None,
                    ) -> dict[str, Any]:
    turn = chat_turn("Turn on dark mode.", "click(120, 64)", feedback=feedback)
    turn.update(next_state=list(state), next_state_kind="user", next_state_status="paired")
    return turn


async def test_a_screenshot_alone_gets_no_verdict_and_the_reason_says_so():
    judgment = await JUDGE.judge(screenshot_turn({"role": "user", "content": [SCREEN]}))
    assert (judgment.score, judgment.votes, judgment.source, judgment.hints) == (
        0, (None,), "none", ())
    assert judgment.extra["signal"] == "image_only"
    assert "no verdict" in judgment.texts[0] and "reads text only" in judgment.texts[0]


async def test_a_screenshot_after_a_bare_tool_result_gets_no_verdict_either():
    judgment = await JUDGE.judge(screenshot_turn(
        {"role": "tool", "tool_call_id": "c1", "content": ""},
        {"role": "user", "content": [SCREEN, SCREEN]}))
    assert judgment.source == "none" and "2 image(s)" in judgment.texts[0]


async def test_explicit_feedback_on_a_screenshot_counts_but_the_rules_cast_no_vote():
    judgment = await JUDGE.judge(screenshot_turn(
        {"role": "user", "content": [SCREEN]},
        feedback=[{"score": -1, "hint": "Use the toggle.", "created_at": 1.0}]))
    assert (judgment.score, judgment.source, judgment.votes) == (-1, "feedback", (None,))
    assert judgment.hints == ("Use the toggle.",)
    assert "reads text only" in judgment.texts[0]


async def test_text_beside_a_screenshot_is_judged_and_the_image_is_said_unread():
    judgment = await JUDGE.judge(screenshot_turn({"role": "user", "content": [
        {"type": "text", "text": "No, that's the wrong button."}, SCREEN]}))
    assert (judgment.score, judgment.source) == (-1, "judge")
    assert judgment.hints == ("No, that's the wrong button.",)  # no image placeholder
    assert "1 image(s) in the next state not read" in judgment.texts[0]
    tool = await JUDGE.judge(screenshot_turn(
        {"role": "tool", "tool_call_id": "c1", "content": "exit code 0"},
        {"role": "user", "content": [SCREEN]}))
    assert (tool.score, tool.extra["signal"]) == (1, "tool_ok")


async def test_an_observation_worded_as_the_last_one_with_a_new_screen_is_no_rephrase():
    """A GUI harness words each step's observation alike ("The screen after your
    action."): with a new screen it is what the action did, not the request asked again."""
    turn = chat_turn("The screen after your action.", "click(120, 64)")
    turn.update(next_state=[{"role": "user", "content": [
        {"type": "text", "text": "The screen after your action."}, SCREEN]}],
        next_state_kind="user", next_state_status="paired")
    judgment = await JUDGE.judge(turn)
    assert judgment.extra["signal"] != "rephrase" and judgment.hints == ()
    assert (await JUDGE.judge(chat_turn("The screen after your action.", "click(120, 64)",
                                        "The screen after your action."))).extra[
        "signal"] == "rephrase"  # the same words without a screen: asked again
