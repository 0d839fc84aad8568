"""The judging stage with a fake judge and teacher, on SQLite and PostgreSQL."""

import itertools

import pytest

from nextstate.core.records import FeedbackRecord, TurnRecord
from nextstate.core.store import Store
from nextstate.learner.judging import JudgingConfig, judge_pending
from nextstate.learner.judgment import JudgeError, Judgment

_ids = itertools.count()


def turn(session, text, reply, at):
    return TurnRecord(
        turn_id=f"t{next(_ids)}", endpoint="chat", created_at=at, session_id=session,
        request={"messages": [{"role": "user", "content": text}]},
        response={"choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                               "token_ids": [4, 5], "finish_reason": "stop"}],
                  "prompt_token_ids": [1]})


class FakeJudge:
    name = "fake"
    prompt_version = "v0"

    def __init__(self, fail_times=0):
        self.calls = []
        self.fail_times = fail_times

    async def judge(self, t):
        self.calls.append(t["turn_id"])
        if len(self.calls) <= self.fail_times:
            raise JudgeError("judge is down")
        return Judgment(score=-1, votes=(-1,), hints=("Say it in French.",),
                        judge=self.name, prompt_version=self.prompt_version)


class FakeTeacher:
    model = "base"

    def model_for(self, t):
        return self.model

    async def logprobs(self, t, hint):
        return [-0.5] * len(t["completion_token_ids"])


@pytest.fixture
def store(store_url):
    s = Store(store_url)
    s.turns.write([turn("s", "hi", "hello", 1.0), turn("s", "no, in French", "bonjour", 2.0),
                   turn("s2", "bye", "ciao", 3.0)])
    s.retention.expire_idle(idle_seconds=10, now=100.0)  # s's last turn and s2 end
    yield s
    s.close()


async def test_each_turn_with_a_next_state_is_judged_once(store):
    judge = FakeJudge()
    report = await judge_pending(store.judgments, judge, FakeTeacher())
    assert report.judged == 3
    assert len(judge.calls) == 1  # turns that ended without a next state need no judge
    first = store.judgments.get(judge.calls[0])
    assert (first["score"], first["hints"], first["teacher_logprobs"]) == (
        -1, ["Say it in French."], [[-0.5, -0.5]])
    assert (await judge_pending(store.judgments, judge, FakeTeacher())).judged == 0
    assert len(judge.calls) == 1
    counts = store.judgments.counts()
    assert counts["judged"] == 3 and counts["awaiting_judgment"] == 0


async def test_a_failing_judge_leaves_the_turn_for_later_with_the_reason(store):
    judge = FakeJudge(fail_times=1)
    config = JudgingConfig(retry_after=0.0)
    report = await judge_pending(store.judgments, judge, None, config)
    assert report.failed == 1
    failed = store.judgments.get(judge.calls[0])
    assert failed["status"] == "error" and "judge is down" in failed["error"]
    assert store.judgments.counts()["awaiting_judgment"] == 1
    await judge_pending(store.judgments, judge, None, config)
    again = store.judgments.get(judge.calls[0])
    assert (again["status"], again["attempts"], again["error"]) == ("ok", 1, None)


async def test_feedback_after_judging_brings_the_turn_back(store):
    judge = FakeJudge()
    await judge_pending(store.judgments, judge, None)
    target = judge.calls[0]
    store.turns.write([FeedbackRecord(feedback_id="f", created_at=1e12, score=1, source="endpoint",
                                      turn_id=target)])
    await judge_pending(store.judgments, judge, None)
    assert judge.calls == [target, target]
