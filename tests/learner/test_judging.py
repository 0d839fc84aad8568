"""The judging stage with a fake judge and teacher, on SQLite and PostgreSQL."""

import itertools

import pytest

from bench.gui_session import data_url, gui_session
from nextstate.core.records import FeedbackRecord, TurnRecord
from nextstate.core.sessions import image_urls
from nextstate.core.store import Store
from nextstate.learner.judging import JudgingConfig, judge_pending
from nextstate.learner.judgment import JudgeError, Judgment
from nextstate.learner.rules import RulesJudge

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

    def scores(self, t):
        return True

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


@pytest.fixture
def empty_store(store_url):
    s = Store(store_url)
    yield s
    s.close()


class SeeingJudge(FakeJudge):
    """Remembers the image URLs of each turn it is given."""

    def __init__(self):
        super().__init__()
        self.urls = {}

    async def judge(self, t):
        self.urls[t["turn_id"]] = image_urls(t["request"]["messages"] + t["next_state"])
        return await super().judge(t)


async def test_a_gui_turn_reaches_the_judge_with_its_images_inline(empty_store):
    shots, records = gui_session(3, session_id="gui")
    s = empty_store
    s.turns.write(records)
    judge = SeeingJudge()
    assert (await judge_pending(s.judgments, judge, None)).judged == 2  # the last: pending
    assert judge.urls[records[1].turn_id] == [data_url(shot) for shot in shots]
    stored = s.turns.get(records[1].turn_id)
    assert image_urls(stored["request"]["messages"])[0].startswith("nextstate-image:")


class SeeingTeacher(FakeTeacher):
    """Scores image turns or not (``can``: whether it knows the model's image token),
    and remembers the image URLs of each turn it is asked about."""

    def __init__(self, can):
        self.can, self.asked = can, {}

    def scores(self, t):
        return self.can

    async def logprobs(self, t, hint):
        assert self.can, "a teacher that cannot score images was asked"
        self.asked[t["turn_id"]] = image_urls(t["request"]["messages"])
        return await super().logprobs(t, hint)


@pytest.mark.parametrize("can", [True, False])
async def test_a_gui_turn_with_a_hint_is_scored_with_its_screens_when_the_teacher_can(
        empty_store, can):
    """The teacher gets the turn with its images inline (it scores them with vLLM's
    render and token-in routes); one that does not know the model's image token (a
    learner without the model's directory) is not asked, and the turn is still judged."""
    shots, records = gui_session(3, session_id="gui")
    s = empty_store
    s.turns.write(records)
    teacher = SeeingTeacher(can)
    report = await judge_pending(s.judgments, FakeJudge(), teacher)
    assert (report.judged, report.failed, report.hints) == (2, 0, 2)
    row = s.judgments.get(records[0].turn_id)
    assert row["hints"] == ["Say it in French."]
    if can:
        # Inline, as the client sent them.
        assert teacher.asked[records[0].turn_id] == image_urls(records[0].request["messages"])
        assert teacher.asked[records[0].turn_id][0] == data_url(shots[0])
        completion = records[0].response["choices"][0]["token_ids"]
        assert row["teacher_logprobs"] == [[-0.5] * len(completion)]
    else:
        assert not row["teacher_logprobs"] and teacher.asked == {}


async def test_the_rules_record_no_verdict_on_a_screenshot_with_the_reason(empty_store):
    shots, records = gui_session(2, session_id="gui")
    s = empty_store
    s.turns.write(records)
    report = await judge_pending(s.judgments, RulesJudge(), None)
    assert (report.judged, report.failed) == (1, 0)
    row = s.judgments.get(records[0].turn_id)
    assert (row["status"], row["source"], row["score"], row["votes"]) == (
        "ok", "none", 0, [None])
    assert "reads text only" in row["texts"][0]
    assert s.judgments.ready_for_training("combined", 10) == []


async def test_a_turn_whose_images_were_forgotten_meanwhile_is_not_judged(empty_store):
    shots, records = gui_session(2, session_id="gui")
    s = empty_store
    s.turns.write(records)
    waiting = s.judgments.to_judge(10)
    s.retention.forget(session_id="gui")

    class Stale:
        turns = s.judgments.turns
        save_error = s.judgments.save_error

        def to_judge(self, *args, **kwargs):
            return waiting

    report = await judge_pending(Stale(), FakeJudge(), None)
    assert report.failed == 1 and "ImageMissing" in report.last_error
    assert s.judgments.get(records[0].turn_id) is None  # forgotten: nothing kept
