"""The learner's Prometheus metrics (store -> learner -> judge -> trainer -> publish;
learner -> ``GET /metrics`` on its own port, ``nextstate learn --metrics-port``).

An observer (`observers.Observer`) with its own registry: every step counts by outcome
and sets the last step's numbers; every round's report sets where the turns are. The
learner serves them from a thread of prometheus_client's (`serve`), separate from the
proxy's ``/metrics``: the two are separate processes, and scraping one never waits on
the other.

    nextstate_learner_turns{state}                  recorded, awaiting_next_state,
                                                    awaiting_judgment, judged,
                                                    judge_errors, ready, trained
    nextstate_learner_rewards{score}                judged turns by score (+1, 0, -1)
    nextstate_learner_reward_mean                   their mean
    nextstate_learner_{judged,judge_failures,hints}_total   this process's judging
    nextstate_learner_steps_total{outcome,lane}     published, skipped, refused, failed
    nextstate_learner_publishes_total{lane}         adapter versions made current
    nextstate_learner_gate_events_total{event}      refused, retried (a smaller rate)
    nextstate_learner_step_{loss,kl,clip_fraction,advantage_mean,reward_mean,
        tokens_per_second,seconds,turns}{lane}      the last step
    nextstate_learner_adapter_version               the version serving the policy
    nextstate_learner_state{state}                  1 for idle, judging or training
    nextstate_learner_health{state}                 1 for learning, stalled or blocked
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nextstate.learner.observers import Report, Step

STEP_NUMBERS = ("loss", "kl", "clip_fraction", "advantage_mean", "reward_mean",
                "tokens_per_second", "seconds", "turns")
STATES = ("idle", "judging", "training")
HEALTH = ("learning", "stalled", "blocked")


def _lane(step: Step) -> str:
    return "personal" if step.get("user") is not None else "shared"


class LearnerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.steps = Counter("nextstate_learner_steps", "Training steps, by outcome",
                             ["outcome", "lane"], registry=self.registry)
        self.publishes = Counter("nextstate_learner_publishes",
                                 "Adapter versions published", ["lane"], registry=self.registry)
        self.gate = Counter("nextstate_learner_gate_events", "The publish gate: steps "
                            "refused, or taken again at a smaller learning rate",
                            ["event"], registry=self.registry)
        self.last = {name: Gauge(f"nextstate_learner_step_{name}",
                                 f"The last step's {name.replace('_', ' ')}", ["lane"],
                                 registry=self.registry) for name in STEP_NUMBERS}
        self.report = _Report()
        self.registry.register(self.report)
        self._server: tuple[WSGIServer, threading.Thread] | None = None

    # -- the observer ---------------------------------------------------------------------

    def step(self, step: Step, report: Report) -> None:
        lane = _lane(step)
        outcome = str(step.get("outcome"))
        self.steps.labels(outcome, lane).inc()
        if outcome == "published":
            self.publishes.labels(lane).inc()
            if float((step.get("extra") or {}).get("lr_scale", 1.0)) < 1.0:
                self.gate.labels("retried").inc()
        elif outcome == "refused":
            self.gate.labels("refused").inc()
        for name, gauge in self.last.items():
            value = step.get(name)
            if isinstance(value, int | float):
                gauge.labels(lane).set(value)

    def round(self, report: Report) -> None:
        self.report.latest = report

    def close(self) -> None:
        if self._server is not None:
            server, thread = self._server
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._server = None

    # -- serving ----------------------------------------------------------------------------

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """``GET /metrics`` on ``host:port`` (0: any free port), from a daemon thread;
        returns the port."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = (server, thread)
        return int(server.server_port)


class _Report(Collector):
    """The numbers of the learner's last report (its status row)."""

    def __init__(self) -> None:
        self.latest: Report = {}

    def collect(self) -> Iterable[Metric]:
        report = self.latest
        turns = GaugeMetricFamily("nextstate_learner_turns", "Turns, by where they are in "
                                  "the loop", labels=["state"])
        for state, n in (report.get("counts") or {}).items():
            turns.add_metric([state], float(n))
        yield turns
        rewards = report.get("rewards") or {}
        scores = GaugeMetricFamily("nextstate_learner_rewards", "Judged turns, by score",
                                   labels=["score"])
        for score, n in (rewards.get("scores") or {}).items():
            scores.add_metric([score], float(n))
        yield scores
        if rewards.get("mean") is not None:
            yield GaugeMetricFamily("nextstate_learner_reward_mean",
                                    "Mean score of the judged turns", value=rewards["mean"])
        totals: dict[str, Any] = report.get("totals") or {}
        for name, about in (("judged", "Turns this process judged"),
                            ("judge_failures", "Turns the judge failed on (retried)"),
                            ("hints", "Hints this process got teacher logprobs for")):
            yield CounterMetricFamily(f"nextstate_learner_{name}", about,
                                      value=float(totals.get(name) or 0))
        adapter = report.get("adapter") or {}
        yield GaugeMetricFamily("nextstate_learner_adapter_version", "The version serving "
                                "the policy (0: the base model)",
                                value=float(adapter.get("version") or 0))
        yield _one_hot("nextstate_learner_state", "What the learner is doing", STATES,
                       report.get("state"))
        yield _one_hot("nextstate_learner_health", "Is it learning (nextstate doctor's "
                       "verdict)", HEALTH, (report.get("health") or {}).get("state"))


def _one_hot(name: str, about: str, values: tuple[str, ...], current: Any) -> Metric:
    family = GaugeMetricFamily(name, about, labels=["state"])
    for value in values:
        family.add_metric([value], 1.0 if value == current else 0.0)
    return family
