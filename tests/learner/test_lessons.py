"""The learner's side of the memory: hints become lessons, served lessons are credited or
dropped, and a turn served with lessons is distilled from them (teacher with, student
without), against a vLLM-shaped fake."""

import httpx
import orjson
import pytest

from nextstate.core.hints import HINT_MARKER
from nextstate.core.records import TurnRecord
from nextstate.core.store import Store
from nextstate.core.vllm import VLLMClient
from nextstate.learner.config import MemoryConfig
from nextstate.learner.items import to_item
from nextstate.learner.judging import judge_pending
from nextstate.learner.judgment import Judgment
from nextstate.learner.lessons import Keeper, situation
from nextstate.learner.teacher import Teacher

ASK = "Ben has 3 apples and buys 2 more. How many apples?"
LESSON = "Show the steps."
SERVED = {"ids": ["L1"], "hint": LESSON, "message": 0, "part": None,
          "offset": len(ASK), "added": 0}
WITH, WITHOUT = [1, 2, 3, 99], [1, 2, 3]  # the prompt's ids with the lesson, without


def record(turn_id, session, text, *, lessons=None, user="alice", at=1.0):
    return TurnRecord(
        turn_id=turn_id, endpoint="chat", created_at=at, session_id=session, user=user,
        request={"messages": [{"role": "user", "content": text}]}, lessons=lessons,
        response={"choices": [{"index": 0, "message": {"role": "assistant", "content": "5"},
                               "token_ids": [8, 9], "logprobs": None,
                               "finish_reason": "stop"}],
                  "prompt_token_ids": WITH if lessons else WITHOUT})


class Judge:
    name = "fake"
    prompt_version = "v0"

    def __init__(self, score=-1, hints=("Show me the steps, please.",)):
        self.score, self.hints = score, hints

    async def judge(self, turn):
        return Judgment(score=self.score, votes=(self.score,), hints=self.hints,
                        judge=self.name)


def vllm(seen: list) -> VLLMClient:
    """/tokenize: [1, 2, 3] plus 99 when the lesson is in the prompt and 98 per other hint
    line; /v1/completions: token i scored -i."""

    def answer(request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        seen.append((request.url.path, body))
        if request.url.path == "/tokenize":
            text = body["messages"][-1]["content"]
            hint = text.split(HINT_MARKER)[1].splitlines() if HINT_MARKER in text else []
            return httpx.Response(200, json={"tokens": WITHOUT + [
                99 if line == LESSON else 98 for line in hint]})
        return httpx.Response(200, json={"choices": [{"prompt_logprobs": [None] + [
            {str(t): {"logprob": -float(i)}} for i, t in enumerate(body["prompt"][1:], 1)]}]})

    return VLLMClient("http://vllm", http=httpx.AsyncClient(transport=httpx.MockTransport(
        answer)))


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 's.db'}")
    yield s
    s.close()


async def judged(store, judge, *, learn=True, lessons=SERVED):
    """One two-turn session, the first turn served with ``lessons``; judged."""
    store.turns.write([record("t1", "s", ASK, lessons=lessons),
                       record("t2", "s", "No, show the steps.", at=2.0)])
    store.retention.expire_idle(idle_seconds=10, now=100.0)
    seen: list = []
    teacher = Teacher(vllm(seen), "base")
    report = await judge_pending(store.judgments, judge, teacher,
                                 keeper=Keeper(store.lessons, MemoryConfig(learn=learn)))
    await teacher.close()
    return report, seen


async def test_a_judged_hint_becomes_a_lesson_of_the_turns_user_with_its_situation(store):
    report, _ = await judged(store, Judge(), lessons=None)
    [lesson] = store.lessons.find(every_tenant=True)
    assert (lesson["text"], lesson["user"], lesson["origin"]) == (
        "Show me the steps, please.", "alice", "judge")
    assert lesson["context"] == ASK
    assert store.lessons.get(lesson["id"])["sources"] == ["t1"]
    assert report.lessons_learned == 1


async def test_without_learning_on_hints_make_no_lessons(store):
    await judged(store, Judge(), learn=False, lessons=None)
    assert store.lessons.find(every_tenant=True) == []


async def test_a_turn_served_with_lessons_keeps_its_prompt_without_them_for_the_student(
        store):
    store.lessons.learn(LESSON, tenant=None, user="alice", turn_id="t0")
    _, seen = await judged(store, Judge(score=1, hints=()), learn=False)
    judgment = store.judgments.get("t1")
    # The student's prompt: the client's request, tokenized without the lesson.
    assert judgment["student_prompt_ids"] == WITHOUT
    tokenized = [body for path, body in seen if path == "/tokenize"]
    assert tokenized[0]["messages"] == [{"role": "user", "content": ASK}]
    # No hint: the teacher is the prompt the model saw, lessons included (recorded ids).
    assert [body["prompt"] for path, body in seen if path == "/v1/completions"] == [
        WITH + [8, 9]]
    assert judgment["teacher_logprobs"] == [[-4.0, -5.0]]
    assert store.judgments.get("t2")["student_prompt_ids"] is None  # served without


async def test_a_hint_on_a_turn_served_with_lessons_joins_them_in_the_teachers_prompt(
        store):
    await judged(store, Judge(), learn=False)
    judgment = store.judgments.get("t1")
    assert judgment["teacher_logprobs"] == [[-5.0, -6.0]]  # prompt: lesson line + hint line
    assert judgment["student_prompt_ids"] == WITHOUT


async def test_the_score_of_a_turn_served_with_lessons_counts_for_them(store):
    lesson, _ = store.lessons.learn(LESSON, tenant=None, user="alice", turn_id="t0")
    await judged(store, Judge(score=1, hints=()), learn=False,
                 lessons={**SERVED, "ids": [lesson]})
    row = store.lessons.get(lesson)
    assert (row["served"], row["helped"]) == (1, 1) and row["last_useful_at"] is not None


def test_a_lesson_whose_served_turns_keep_being_corrected_is_dropped(store):
    lesson, _ = store.lessons.learn(LESSON, tenant=None, user="alice", turn_id="t0")
    keeper = Keeper(store.lessons, MemoryConfig(drop_after=2))
    corrected = Judgment(score=-1)
    turn = {"lessons": {"ids": [lesson]}, "user": "alice", "tenant": None}
    assert keeper.after({**turn, "turn_id": "a"}, corrected).dropped == 0
    assert keeper.after({**turn, "turn_id": "b"}, corrected).dropped == 1
    assert store.lessons.get(lesson)["status"] == "dropped"


def test_the_student_trains_on_the_prompt_without_lessons_and_is_marked_for_it():
    row = {"id": "t", "prompt_token_ids": WITH, "completion_token_ids": [8, 9],
           "logprobs": [-0.1, -0.2], "session_id": "s", "score": 1,
           "teacher_logprobs": [[-0.3, -0.4]], "student_prompt_ids": WITHOUT}
    item = to_item(row)
    assert item.prompt_ids == WITHOUT and item.context
    assert item.teacher_logprobs == [-0.3, -0.4]
    plain = to_item({**row, "student_prompt_ids": None})
    assert plain.prompt_ids == WITH and not plain.context


def test_a_lessons_situation_is_the_message_it_corrected():
    assert situation({"endpoint": "chat", "request": {"messages": [
        {"role": "user", "content": "first"}, {"role": "assistant", "content": "x"},
        {"role": "user", "content": [{"type": "text", "text": "second"}]}]}}) == "second"
    assert situation({"endpoint": "completions", "request": {"prompt": "p"}}) == "p"
