"""The store's facts about the loop, on SQLite and PostgreSQL: every place a turn, a hint or
a step is lost is counted with its reason."""

from __future__ import annotations

import itertools
import time

from nextstate.core.lora import AdapterStatus
from nextstate.core.records import TurnRecord
from nextstate.core.store import Store
from nextstate.core.store.facts import loop_facts
from tests.core.store.verdicts import Verdict

_ids = itertools.count()


def turn(*, session: str | None = None, turn_type: str = "main", token_ids: bool = True,
         at: float | None = None) -> TurnRecord:
    n = next(_ids)
    choice = {"index": 0, "message": {"role": "assistant", "content": f"reply {n}"},
              "logprobs": {"content": [{"logprob": -1.0}]}, "finish_reason": "stop"}
    response = {"model": "m", "choices": [choice],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    if token_ids:
        choice["token_ids"] = [5]
        response["prompt_token_ids"] = [1]
    return TurnRecord(
        turn_id=f"f{n}", endpoint="chat", created_at=at if at is not None else time.time(),
        request={"model": "m", "messages": [{"role": "user", "content": f"question {n}"}]},
        session_id=session, turn_type=turn_type, session_done=True, status="ok",
        response=response)


def test_turns_sessions_and_lost_tokens_are_counted(store: Store) -> None:
    store.turns.write([turn(session="a"), turn(session="a"), turn(session="b"),
                       turn(turn_type="side"), turn(session="c", token_ids=False)])
    facts = loop_facts(store.db.engine)
    assert (facts.turns, facts.main_turns, facts.side_turns) == (5, 4, 1)
    assert (facts.sessions, facts.single_turn_sessions) == (3, 2)
    assert sum(facts.untrainable.values()) == 1
    assert facts.no_next_state >= 2  # sessions b and c ended with their only turn


def test_judgments_votes_hints_and_skips_are_counted_by_reason(store: Store) -> None:
    turns = [turn(session=f"s{i}") for i in range(6)]
    store.turns.write(turns)
    ids = [t.turn_id for t in turns]
    store.judgments.save(ids[0], Verdict(-1, hints=("use steps",)))
    store.judgments.save(ids[1], Verdict(-1))
    store.judgments.save(ids[2], Verdict(1))
    store.judgments.save(ids[3], Verdict(0))
    store.judgments.save_error(ids[4], "JudgeError: timed out after 60s")
    store.judgments.skip(ids[:2], "publish gate: 2.000 at 0.25x")
    facts = loop_facts(store.db.engine)
    assert facts.judged == 4
    assert facts.votes == {"-1": 2, "+1": 1, "0": 1}
    assert (facts.corrections, facts.corrections_without_hint) == (2, 1)
    assert facts.judge_errors == {"JudgeError: timed out after 60s": 1}
    assert facts.skipped == {"publish gate: 2.000 at 0.25x": 2}


def test_adapters_current_and_failed_are_read(store: Store) -> None:
    store.turns.write([turn()])
    store.adapters.stage(1, "m@000001", "m", "/a/1", {})
    store.adapters.publish(1, [], "m")
    store.adapters.stage(2, "m@000002", "m", "/a/2", {})
    store.adapters.set_status(2, AdapterStatus.FAILED, "LoRA rank 32 is greater than 16")
    facts = loop_facts(store.db.engine)
    assert facts.current == ("m@000001",)
    assert facts.failed_adapters == ("LoRA rank 32 is greater than 16",)
    assert facts.adapters == {"current": 1, "failed": 1}


def test_since_counts_only_recent_traffic(store: Store) -> None:
    store.turns.write([turn(at=100.0), turn(at=time.time())])
    assert loop_facts(store.db.engine).turns == 2
    assert loop_facts(store.db.engine, since=time.time() - 60).turns == 1
