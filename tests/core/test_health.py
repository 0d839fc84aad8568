"""Each trap a setup falls into, seeded as store facts or a learner report, is named
with its fix; the verdict follows (learning / stalled / blocked)."""

from __future__ import annotations

from nextstate.core.health import (
    Finding,
    LoopFacts,
    judge_findings,
    learning_health,
    session_findings,
    store_findings,
    token_findings,
    training_findings,
)

NOW = 1_000_000.0


def report(**overrides: object) -> dict:
    return {"updated_at": NOW - 5, "pid": 42, "method": "combined", "batch_turns": 16,
            "counts": {"ready": 3, "trained": 0}, "steps": [], **overrides}


def levels(found: list[Finding]) -> dict[str, str]:
    return {f.check: f.level for f in found}


def test_every_turn_a_side_turn_blocks_and_names_the_session_headers() -> None:
    found = session_findings(LoopFacts(turns=40, main_turns=0, side_turns=40))
    assert levels(found) == {"sessions.side": "block"}
    assert "X-Turn-Type: side" in found[0].fix


def test_mostly_side_turns_warn_and_a_few_turns_say_nothing_yet() -> None:
    assert levels(session_findings(LoopFacts(main_turns=10, side_turns=30))) == {
        "sessions.side": "warn"}
    assert levels(session_findings(LoopFacts(main_turns=2, side_turns=3))) == {
        "sessions": "ok"}


def test_sessions_of_one_turn_and_turns_without_next_state_are_named() -> None:
    found = levels(session_findings(LoopFacts(main_turns=20, no_next_state=15, sessions=20,
                                              single_turn_sessions=20)))
    assert found == {"sessions.next_state": "warn", "sessions.single": "warn"}


def test_a_router_that_strips_token_ids_is_named_and_blocks_when_it_is_every_turn() -> None:
    lost = "the stream had no prompt token ids"
    every = token_findings(LoopFacts(main_turns=12, untrainable={lost: 12}))
    assert levels(every) == {"tokens.untrainable": "block"}
    assert lost in every[0].what and "return_token_ids" in every[0].fix
    some = token_findings(LoopFacts(main_turns=12, untrainable={lost: 3}))
    assert levels(some) == {"tokens.untrainable": "warn"}


def test_a_judge_that_times_out_is_named_with_the_timeout() -> None:
    facts = LoopFacts(judged=0, judge_errors={"JudgeError: timed out after 60s (3)": 9})
    found = judge_findings(facts)
    assert levels(found) == {"judge.errors": "block"}
    assert "9 of them timing out" in found[0].what
    assert "--judge rules" in found[0].fix
    assert levels(judge_findings(LoopFacts(judged=5, judge_errors={"x": 1}))) == {
        "judge.errors": "warn"}


def test_votes_all_the_same_and_mostly_neutral_are_named() -> None:
    one = levels(judge_findings(LoopFacts(judged=20, votes={"-1": 20})))
    assert one == {"judge.one_vote": "warn"}
    neutral = levels(judge_findings(LoopFacts(judged=20, votes={"0": 15, "+1": 5})))
    assert neutral == {"judge.zero_votes": "warn"}
    fine = levels(judge_findings(LoopFacts(judged=20, votes={"+1": 10, "-1": 10})))
    assert fine == {"judge": "ok"}


def test_corrections_without_hints_are_named() -> None:
    found = judge_findings(LoopFacts(judged=4, votes={"-1": 2, "+1": 2}, corrections=4,
                                     corrections_without_hint=3))
    assert levels(found) == {"judge.hints": "warn"}


def test_no_learner_and_a_silent_learner_block() -> None:
    assert levels(training_findings(LoopFacts(), None, NOW)) == {"learner.running": "block"}
    silent = training_findings(LoopFacts(), report(updated_at=NOW - 600), NOW)
    assert levels(silent)["learner.running"] == "block"
    assert "600 s ago" in next(f.what for f in silent if f.check == "learner.running")


def test_batch_progress_says_how_many_turns_a_step_still_waits_for() -> None:
    found = training_findings(LoopFacts(), report(), NOW)
    assert levels(found) == {"training.batch": "ok"}
    assert "a step starts after 13 more" in found[0].what


def test_gate_refusals_zero_advantage_and_staleness_are_counted_with_their_reasons() -> None:
    gate = ("publish gate: the step moved the policy 3.100 at 1x, 2.000 at 0.5x, 1.400 at "
            "0.25x the learning rate (nats/token), over the bound 1.0")
    facts = LoopFacts(skipped={gate: 16, "no combined signal in these 16 turns": 16,
                               "stale: served more than 4 versions ago": 2})
    found = training_findings(facts, report(counts={"ready": 20}), NOW)
    assert levels(found) == {"training.gate": "warn", "training.zero_advantage": "warn",
                             "training.stale": "warn"}
    gate_finding = next(f for f in found if f.check == "training.gate")
    assert "1.400" in gate_finding.what and "--learning-rate" in gate_finding.fix


def test_every_recent_step_refused_or_without_signal_blocks_learning() -> None:
    """Once the last three steps were all refused (or all had no signal), the next ones
    will be too until the setup changes: doctor says block and exits non-zero."""
    gate = "publish gate: the step moved the policy 1.400 at 0.25x the learning rate"
    facts = LoopFacts(skipped={gate: 48, "no binary signal in these 16 turns": 48})
    refused = report(steps=[{"outcome": "refused"}] * 3)
    skipped = report(steps=[{"outcome": "skipped"}] * 3)
    mixed = report(steps=[{"outcome": "refused"}, {"outcome": "published"},
                          {"outcome": "refused"}])
    assert levels(training_findings(facts, refused, NOW))["training.gate"] == "block"
    assert levels(training_findings(facts, skipped, NOW))["training.zero_advantage"] == "block"
    assert levels(training_findings(facts, mixed, NOW)) == {
        "training.batch": "ok", "training.gate": "warn", "training.zero_advantage": "warn"}
    assert learning_health(training_findings(facts, refused, NOW), refused)["state"] == \
        "blocked"


def test_failed_loads_name_the_fix_from_vllms_error() -> None:
    steps = [{"outcome": "failed", "error": "vLLM at http://x refused load adapter p@000001 "
              "(500): LoRA rank 32 is greater than max_lora_rank 16."}]
    found = training_findings(LoopFacts(), report(steps=steps), NOW)
    publish = next(f for f in found if f.check == "training.publish")
    assert publish.level == "block" and "--max-lora-rank 32" in publish.fix


def test_the_verdict_is_blocked_stalled_or_learning() -> None:
    blocked = learning_health(store_findings(LoopFacts(), None, NOW), None)
    assert blocked["state"] == "blocked" and "no learner" in blocked["why"][0]
    refused = [{"outcome": "refused"}, {"outcome": "skipped"}, {"outcome": "refused"}]
    facts = LoopFacts(main_turns=30, sessions=10, judged=30, votes={"+1": 15, "-1": 15})
    stalled = learning_health(store_findings(facts, report(steps=refused), NOW),
                              report(steps=refused))
    assert stalled["state"] == "stalled"
    assert "refused, skipped, refused" in stalled["why"][0]
    going = [{"outcome": "refused"}, {"outcome": "published"}]
    learning = learning_health(store_findings(facts, report(steps=going), NOW),
                               report(steps=going))
    assert learning["state"] == "learning"


def test_findings_serialise_for_json() -> None:
    f = Finding("x.y", "warn", "what", "why", "fix")
    assert f.as_dict() == {"check": "x.y", "level": "warn", "what": "what", "why": "why",
                           "fix": "fix"}
