"""The funnel on SQLite and PostgreSQL: every turn is in one stage or dropped with its
reason, the stages agree with the learner's own counts, and a tenant sees its own."""

from __future__ import annotations

import itertools
import time

from nextstate.core.records import TurnRecord
from nextstate.core.store import Store
from tests.core.store.verdicts import Verdict

_ids = itertools.count()


def turn(*, tenant: str | None = None, turn_type: str = "main", done: bool = True,
         status: str = "ok", secret: bool = False, user: str | None = None) -> TurnRecord:
    n = next(_ids)
    text = "my key is sk-abcdefghijklmnopqrstuvwx1234" if secret else f"question {n}"
    choice = {"index": 0, "message": {"role": "assistant", "content": f"reply {n}"},
              "token_ids": [5, 6], "logprobs": {"content": [{"logprob": -1.0}] * 2},
              "finish_reason": "stop"}
    return TurnRecord(
        turn_id=f"u{n}", endpoint="chat", created_at=time.time(), session_id=f"s{n}",
        request={"model": "m", "messages": [{"role": "user", "content": text}]},
        turn_type=turn_type, session_done=done, status=status, tenant=tenant, user=user,
        response={"model": "m", "choices": [choice], "prompt_token_ids": [1],
                  "usage": {"prompt_tokens": 1, "completion_tokens": 2}})


def by_key(funnel: dict) -> dict:
    return {stage["key"]: stage for stage in funnel["stages"]}


def drops(stage: dict) -> dict[str, int]:
    return {d["reason"]: d["count"] for d in stage["drops"] if d["count"]}


def test_every_turn_is_in_a_stage_or_dropped_with_its_reason(store: Store) -> None:
    t = [turn() for _ in range(9)]
    side, failed, pending = turn(turn_type="side"), turn(status="aborted"), turn(done=False)
    secret = turn(secret=True)
    store.turns.write([*t, side, failed, pending, secret])
    ids = [x.turn_id for x in t]
    store.judgments.save(ids[0], Verdict(-1, hints=("only the number",)),
                         teacher_logprobs=[[-0.1, -0.2]])
    store.judgments.save(ids[1], Verdict(1))
    store.judgments.save(ids[2], Verdict(-1, source="feedback"))
    store.judgments.save(ids[3], Verdict(0))  # no signal
    store.judgments.save(ids[4], Verdict(1))
    store.judgments.save(ids[5], Verdict(-1))
    store.judgments.save(secret.turn_id, Verdict(-1))  # redacted: its tokens are gone
    store.judgments.save_error(ids[6], "JudgeError: timed out")
    store.adapters.stage(1, "m@000001", "m", "/a/1", {"turns": 2})
    store.adapters.publish(1, [ids[0], ids[1]], "m")
    store.judgments.skip([ids[2]], "stale: served more than 4 versions ago")
    store.judgments.skip([ids[4]], "publish gate: the step moved the policy 3.000 at 1x")

    funnel = store.funnel.read(method="combined", batch_turns=4)
    stages = by_key(funnel)
    assert stages["recorded"]["count"] == 13
    assert drops(stages["recorded"]) == {"side turns (never paired or trained)": 1,
                                         "failed or aborted": 1}
    assert stages["main"]["count"] == 11 and stages["main"]["waiting"]["count"] == 1
    assert stages["judgeable"]["count"] == 10
    assert stages["judgeable"]["waiting"]["count"] == 2  # ids[7], ids[8]: not judged yet
    assert drops(stages["judgeable"]) == {"judge errors (retried, then given up)": 1}
    judged = stages["judged"]
    assert judged["count"] == 7
    assert judged["scores"] == {"+1": 2, "0": 1, "-1": 4}
    assert (judged["with_hints"], judged["from_feedback"]) == (1, 1)
    assert drops(judged) == {"no signal (0, no hint)": 1, "tokens not trainable": 1}
    signal = stages["signal"]
    assert signal["count"] == 5 and signal["waiting"]["count"] == 1  # ids[5] is ready
    assert drops(signal) == {"stale: served too many versions ago": 1,
                             "refused by the publish gate": 1}
    assert stages["trained"]["count"] == 2
    assert funnel["progress"] == {"ready": 1, "batch_turns": 4, "method": "combined",
                                  "fraction": 0.25, "lanes": [{"user": None, "ready": 1}]}
    # The stages are the learner's own counts.
    counts = store.judgments.counts()
    assert (stages["recorded"]["count"], judged["count"]) == (counts["recorded"],
                                                              counts["judged"])
    assert stages["trained"]["count"] == store.judgments.trained_count()
    assert signal["waiting"]["count"] == store.judgments.ready_count("combined")
    # Every judged turn is ready, trained, skipped or dropped for a reason.
    assert judged["count"] == (signal["count"] + sum(drops(judged).values()))
    assert signal["count"] == (signal["waiting"]["count"] + stages["trained"]["count"]
                               + sum(drops(signal).values()))


def test_a_tenant_sees_the_funnel_of_its_own_turns(store: Store) -> None:
    mine, theirs = [turn(tenant="a") for _ in range(3)], [turn(tenant="b") for _ in range(5)]
    store.turns.write([*mine, *theirs, turn(tenant="a", turn_type="side")])
    store.judgments.save(mine[0].turn_id, Verdict(1))
    for other in theirs:
        store.judgments.save(other.turn_id, Verdict(-1))
    a, everyone = by_key(store.funnel.read(tenant="a")), by_key(store.funnel.read())
    assert (a["recorded"]["count"], a["main"]["count"], a["judged"]["count"]) == (4, 3, 1)
    assert drops(a["recorded"]) == {"side turns (never paired or trained)": 1}
    assert a["judged"]["scores"] == {"+1": 1, "0": 0, "-1": 0}
    assert a["signal"]["waiting"]["count"] == 1
    assert (everyone["recorded"]["count"], everyone["judged"]["count"]) == (9, 6)
    assert store.judgments.counts("b")["judged"] == 5


def test_progress_is_per_adapter_with_personal_ones_and_a_tenant_sees_its_users(
        store: Store) -> None:
    """Three of alice's turns wait for her own adapter, two of bob's for the shared one:
    five are ready, but no adapter has a batch of four."""
    alices = [turn(tenant="a", user="a:alice") for _ in range(3)]
    bobs = [turn(tenant="b", user="b") for _ in range(2)]
    store.turns.write([*alices, *bobs])
    for t in [*alices, *bobs]:
        store.judgments.save(t.turn_id, Verdict(-1))
    everyone = store.funnel.read(batch_turns=4, personal_after=3)["progress"]
    assert everyone["lanes"] == [{"user": None, "ready": 2}, {"user": "a:alice", "ready": 3}]
    assert (everyone["ready"], everyone["fraction"]) == (3, 0.75)
    assert store.judgments.ready_count("combined") == 5
    assert store.funnel.read(tenant="b", batch_turns=4, personal_after=3)["progress"][
        "lanes"] == [{"user": None, "ready": 2}]
    assert store.funnel.read(tenant="a", batch_turns=4, personal_after=3)["progress"][
        "lanes"] == [{"user": None, "ready": 2}, {"user": "a:alice", "ready": 3}]
