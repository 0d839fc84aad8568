"""Is it learning? Findings about the loop, and the learning-health verdict.

store -> (facts: `LoopFacts`) -> here -> `nextstate doctor`, `nextstate status` and the
status endpoint. Everything here is a pure function of what the store says (the facts)
and what the learner last reported (its status row), so each trap a setup can fall into
(every turn a side turn, a judge that times out, a gate that refuses every step, tokens
lost on the way) is named the same way by doctor and by status, and tested without a
server. The probes that need a live vLLM or proxy are in `nextstate.core.doctor`.

A finding says what is wrong, why it matters for learning and the exact fix. Its level:
``block`` (nothing will be learned until it is fixed; doctor exits non-zero), ``warn``
(learning is slowed or partly lost) or ``ok`` (checked and fine).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Level = Literal["ok", "warn", "block"]
Verdict = Literal["learning", "stalled", "blocked"]

# A learner that has not written its status for this long is taken for stopped (it
# writes at least once a round, every few seconds).
LEARNER_SILENT_SECONDS = 120.0
# Shares above which a pattern is reported (below them it is ordinary traffic).
SIDE_SHARE = 0.5
NO_NEXT_STATE_SHARE = 0.5
SINGLE_TURN_SESSIONS_SHARE = 0.8
ZERO_VOTE_SHARE = 0.5
MIN_TURNS = 10  # fewer turns than this are too few to call a pattern
# This many steps in a row refused by the gate, or without signal, block learning: the
# next ones will be the same until the setup changes (doctor exits non-zero).
STUCK_STEPS = 3


@dataclass(frozen=True)
class Finding:
    check: str  # a stable name, e.g. "sessions.side" (what --json consumers key on)
    level: Level
    what: str  # one sentence: what is the case
    why: str = ""  # why it matters for learning
    fix: str = ""  # the exact thing to do

    def as_dict(self) -> dict[str, str]:
        return {"check": self.check, "level": self.level, "what": self.what, "why": self.why,
                "fix": self.fix}


@dataclass(frozen=True)
class LoopFacts:
    """What the store says about the loop (`nextstate.core.store.facts.loop_facts`)."""

    turns: int = 0  # every recorded turn
    main_turns: int = 0  # answered main turns (the ones that can be learned from)
    side_turns: int = 0  # answered side turns (never trained on)
    errors: int = 0  # turns that did not end with an answer
    no_next_state: int = 0  # answered main turns whose session ended without a next state
    sessions: int = 0
    single_turn_sessions: int = 0
    untrainable: dict[str, int] = field(default_factory=dict)  # reason -> answered turns
    judged: int = 0
    judge_errors: dict[str, int] = field(default_factory=dict)  # error -> turns
    votes: dict[str, int] = field(default_factory=dict)  # "+1" / "0" / "-1" / "none"
    corrections: int = 0  # judged -1
    corrections_without_hint: int = 0  # judged -1 with no hint: nothing to distil
    skipped: dict[str, int] = field(default_factory=dict)  # skip reason -> turns
    adapters: dict[str, int] = field(default_factory=dict)  # adapter status -> versions
    failed_adapters: tuple[str, ...] = ()  # the errors of the latest failed loads
    current: tuple[str, ...] = ()  # adapter names the store says are served now


def share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _pct(part: int, whole: int) -> str:
    return f"{100 * share(part, whole):.0f}%"


def session_findings(facts: LoopFacts) -> list[Finding]:
    """Turns that can't be learned from for want of a session or a next state."""
    answered = facts.main_turns + facts.side_turns
    found: list[Finding] = []
    if answered < MIN_TURNS:
        return [Finding("sessions", "ok", f"{answered} answered turns so far: too few to "
                        "judge the sessions by")]
    if facts.main_turns == 0:
        found.append(Finding(
            "sessions.side", "block", f"every one of {answered} answered turns is a side turn",
            "side turns are never paired or trained on",
            "the client marks them X-Turn-Type: side (or turn_type in the body): send it "
            "only on calls outside the conversation (titles, summaries), never on the "
            "agent's own turns"))
    elif share(facts.side_turns, answered) > SIDE_SHARE:
        found.append(Finding(
            "sessions.side", "warn",
            f"{_pct(facts.side_turns, answered)} of answered turns are side turns",
            "side turns are never paired or trained on",
            "if these are your agent's own turns, stop sending X-Turn-Type: side on them; "
            "summariser and title calls are side turns by design"))
    if share(facts.no_next_state, facts.main_turns) > NO_NEXT_STATE_SHARE:
        found.append(Finding(
            "sessions.next_state", "warn",
            f"{_pct(facts.no_next_state, facts.main_turns)} of main turns got no next state",
            "a turn is judged from what followed it; without a next state only explicit "
            "feedback can score it",
            "keep the conversation going in one session (send the whole history, or "
            "X-Session-Id), or give feedback (X-NextState-Feedback, POST /v1/feedback); a "
            "client that rewrites earlier messages starts a new session each time"))
    if share(facts.single_turn_sessions, facts.sessions) > SINGLE_TURN_SESSIONS_SHARE:
        found.append(Finding(
            "sessions.single", "warn",
            f"{_pct(facts.single_turn_sessions, facts.sessions)} of {facts.sessions} "
            "sessions have one turn",
            "turns that pair with nothing have no next state to learn from",
            "send X-Session-Id (or x-openclaw-session-key), or resend the history "
            "unchanged: a client that rewrites or truncates history, or a summariser, "
            "breaks automatic matching"))
    return found or [Finding("sessions", "ok", f"{facts.main_turns} main turns pair into "
                             f"{facts.sessions} sessions")]


def token_findings(facts: LoopFacts) -> list[Finding]:
    """Answered turns whose tokens can't be trained on (a router dropped them, ...)."""
    lost = sum(facts.untrainable.values())
    answered = facts.main_turns + facts.side_turns
    if not lost:
        return [Finding("tokens", "ok", "every answered turn has the token ids and "
                        "logprobs vLLM sampled")]
    reason, n = max(facts.untrainable.items(), key=lambda kv: kv[1])
    level: Level = "block" if lost >= answered else "warn"
    return [Finding(
        "tokens.untrainable", level,
        f"{lost} of {answered} answered turns can't be trained on (most often: {reason}, "
        f"{n})", "the learner trains only on the exact tokens vLLM sampled",
        "send requests through the nextstate proxy straight to vLLM; a router or SDK in "
        "between (LiteLLM's stream, a gateway) must pass return_token_ids and logprobs "
        "through untouched")]


_TIMEOUT = re.compile(r"time(d)? ?out|timeout", re.I)


def judge_findings(facts: LoopFacts) -> list[Finding]:
    found: list[Finding] = []
    failing = sum(facts.judge_errors.values())
    if failing:
        error, n = max(facts.judge_errors.items(), key=lambda kv: kv[1])
        timeouts = sum(v for k, v in facts.judge_errors.items() if _TIMEOUT.search(k))
        level: Level = "block" if facts.judged == 0 else "warn"
        found.append(Finding(
            "judge.errors", level,
            f"the judge failed on {failing} turns"
            + (f", {timeouts} of them timing out" if timeouts else "") + f" (e.g. {error})",
            "a turn the judge can't score is retried, then given up: it teaches nothing",
            "the judge answers slower than its timeout (60 s): give nextstate learn a "
            "faster --judge-model, or use --judge rules"
            if timeouts else "check the judge's model and endpoint (nextstate learn "
            "--judge-model, --judge-api-base, its provider's key in the environment), or "
            "use --judge rules"))
    valid = sum(v for k, v in facts.votes.items() if k != "none")
    if facts.judged >= MIN_TURNS and share(facts.votes.get("0", 0), valid) > ZERO_VOTE_SHARE:
        found.append(Finding(
            "judge.zero_votes", "warn",
            f"{_pct(facts.votes.get('0', 0), valid)} of the judge's votes are 0 (neutral)",
            "a neutral turn carries no reward: binary RL learns from +1 and -1 only",
            "the next states may say little (no user reply, bare tool outputs); give "
            "feedback (X-NextState-Feedback) or end episodes with an outcome"))
    if facts.judged >= MIN_TURNS and facts.votes and len(
            [k for k, v in facts.votes.items() if v and k != "none"]) == 1:
        only = next(k for k, v in facts.votes.items() if v and k != "none")
        found.append(Finding(
            "judge.one_vote", "warn", f"every vote the judge gave is {only}",
            "a batch whose rewards are all the same has zero advantage: nothing to learn",
            "check that the next states reach the judge (nextstate export shows them)"))
    if facts.corrections and share(facts.corrections_without_hint, facts.corrections) > 0.5:
        found.append(Finding(
            "judge.hints", "warn",
            f"{facts.corrections_without_hint} of {facts.corrections} corrections came "
            "with no usable hint",
            "distillation (opd, combined) learns only from corrections with a hint",
            "corrections that say what to do instead give hints; binary RL still uses "
            "their -1"))
    if not facts.judged and not failing:
        return [Finding("judge", "ok", "no turn judged yet")]
    return found or [Finding("judge", "ok", f"{facts.judged} turns judged, votes "
                             + ", ".join(f"{k}: {v}" for k, v in sorted(facts.votes.items())))]


def training_findings(facts: LoopFacts, report: Mapping[str, Any] | None,
                      now: float | None = None) -> list[Finding]:
    """The learner itself: is it running, how far is the next step, what did steps do."""
    now = time.time() if now is None else now
    if report is None:
        return [Finding("learner.running", "block", "no learner has reported to this store",
                        "nothing judges or trains the recorded turns",
                        "start it: nextstate learn --backend URL (nextstate up starts one)")]
    found: list[Finding] = []
    age = now - float(report.get("updated_at") or 0)
    if age > LEARNER_SILENT_SECONDS:
        found.append(Finding(
            "learner.running", "block",
            f"the learner last reported {age:.0f} s ago (pid {report.get('pid')})",
            "a stopped learner judges and trains nothing",
            "restart it (nextstate learn ...; its log says why it stopped)"))
    counts = report.get("counts") or {}
    batch = int(report.get("batch_turns") or 16)
    ready = int(counts.get("ready") or 0)
    if report.get("method") and ready < batch:
        found.append(Finding(
            "training.batch", "ok",
            f"{ready}/{batch} judged turns with signal ready: a step starts after "
            f"{batch - ready} more", "", "lower --batch-turns to step sooner"))
    # The same outcome for the last STUCK_STEPS steps: it will go on until fixed.
    recent = [s.get("outcome") for s in list(report.get("steps") or [])[-STUCK_STEPS:]]
    stuck = {recent[0]} if len(recent) == STUCK_STEPS and len(set(recent)) == 1 else set()
    gate = {k: v for k, v in facts.skipped.items() if k.startswith("publish gate")}
    if gate:
        kls = sorted({m for k in gate for m in re.findall(r"(\d+\.\d+) at 0\.25x", k)})
        found.append(Finding(
            "training.gate", "block" if "refused" in stuck else "warn",
            f"the publish gate refused steps ({sum(gate.values())} turns skipped"
            + (f"; KL at the smallest rate {', '.join(kls)} nats/token" if kls else "") + ")",
            "a refused step's turns are skipped: the policy stays as it was",
            "lower nextstate learn's --learning-rate; corrections the teacher "
            "misunderstands move the policy most (the judge's hints are in nextstate "
            "export)"))
    no_signal = sum(v for k, v in facts.skipped.items() if k.startswith("no "))
    if no_signal:
        found.append(Finding(
            "training.zero_advantage", "block" if "skipped" in stuck else "warn",
            f"{no_signal} judged turns were skipped for having no signal (zero advantage)",
            "a batch whose rewards are all equal, or corrections without teacher "
            "logprobs, gives a zero gradient",
            "mix feedback of both signs, or use --method combined so hinted corrections "
            "teach even when every reward is the same"))
    stale = sum(v for k, v in facts.skipped.items() if k.startswith("stale"))
    if stale:
        found.append(Finding(
            "training.stale", "warn", f"{stale} turns were dropped as stale",
            "turns served by a version far behind the current one are off-policy",
            "train more often (a smaller --batch-turns), so turns wait less"))
    steps = list(report.get("steps") or [])
    failed = [s for s in steps if s.get("outcome") == "failed"]
    if failed:
        found.append(Finding(
            "training.publish", "block" if all(s.get("outcome") == "failed" for s in steps)
            else "warn", f"{len(failed)} adapters failed to load: {failed[-1].get('error')}",
            "an adapter that vLLM can't load is never served",
            _load_fix(str(failed[-1].get("error") or ""))))
    errors = (report.get("totals") or {}).get("recent_errors") or []
    if errors:
        found.append(Finding("learner.errors", "warn", f"the learner's last error: "
                             f"{errors[-1]}", "", "see the learner's log for the rest"))
    return found or [Finding("training", "ok", f"{len(steps)} steps, "
                             f"{int(counts.get('trained') or 0)} turns trained on")]


def _load_fix(error: str) -> str:
    rank = re.search(r"rank (\d+) is greater than max_lora_rank (\d+)", error)
    if rank:
        return f"start vLLM with --max-lora-rank {rank.group(1)} (it has {rank.group(2)})"
    if "404" in error or "Not Found" in error:
        return ("start vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 and --enable-lora, so the "
                "learner can load adapters")
    return "see vLLM's log for the load error"


def learning_health(findings: Iterable[Finding], report: Mapping[str, Any] | None
                    ) -> dict[str, Any]:
    """learning / stalled / blocked, and why (the status endpoint's ``health``).

    blocked: something stops learning until fixed (a block finding). stalled: the loop
    runs but its recent steps taught nothing (refused, skipped for no signal, failed), or
    the last steps are all like that. learning: steps publish, or turns are still being
    collected for the next one."""
    findings = list(findings)
    blocks = [f for f in findings if f.level == "block"]
    if blocks:
        return {"state": "blocked", "why": [f.what for f in blocks],
                "fix": [f.fix for f in blocks if f.fix]}
    steps = list((report or {}).get("steps") or [])[-3:]
    if steps and all(s.get("outcome") != "published" for s in steps):
        outcomes = ", ".join(f"{s.get('outcome')}" for s in steps)
        warns = [f for f in findings if f.level == "warn"]
        return {"state": "stalled", "why": [f"the last {len(steps)} steps: {outcomes}",
                                            *(f.what for f in warns)],
                "fix": [f.fix for f in warns if f.fix]}
    why = [f.what for f in findings if f.check == "training.batch"] or [
        f"{sum(1 for s in steps if s.get('outcome') == 'published')} of the last "
        f"{len(steps)} steps published"]
    return {"state": "learning", "why": why, "fix": []}




def store_findings(facts: LoopFacts, report: Mapping[str, Any] | None,
                   now: float | None = None) -> list[Finding]:
    """Everything the store and the learner's report show: sessions, tokens, the judge,
    training (doctor adds the live checks of `nextstate.core.doctor`)."""
    return [*session_findings(facts), *token_findings(facts), *judge_findings(facts),
            *training_findings(facts, report, now)]
