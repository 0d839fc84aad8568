"""The learner's Prometheus metrics: served over HTTP, parsed with prometheus_client's
own parser, moving with each step and round it observes."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nextstate.learner.metrics import LearnerMetrics
from nextstate.learner.observers import tell

REPORT = {"state": "idle", "counts": {"recorded": 20, "judged": 12, "ready": 3, "trained": 8},
          "rewards": {"scores": {"+1": 5, "0": 3, "-1": 4}, "mean": 0.0833},
          "totals": {"judged": 12, "judge_failures": 1, "hints": 4},
          "adapter": {"name": "p@000002", "version": 2}, "health": {"state": "learning"}}


def step(outcome: str, version: int | None, **numbers: float) -> dict:
    return {"version": version, "name": f"p@{version:06d}" if version else None,
            "policy": "p", "outcome": outcome, "user": None, "turns": 4, "loss": 0.5,
            "kl": 0.02, "clip_fraction": 0.1, "tokens_per_second": 900.0,
            "extra": {}, **numbers}


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def served():
    metrics = LearnerMetrics()
    port = metrics.serve(0)
    yield metrics, port
    metrics.close()


def test_steps_and_rounds_move_the_served_metrics(served):
    metrics, port = served
    before = scrape(port)
    assert ("nextstate_learner_steps_total", (("lane", "shared"), ("outcome", "published"))) \
        not in before
    tell([metrics], REPORT, step("published", 1, loss=0.7))
    tell([metrics], REPORT, step("published", 2, extra={"lr_scale": 0.5}))
    tell([metrics], REPORT, step("refused", None, kl=3.2))
    tell([metrics], REPORT, None)  # a round without a step
    found = scrape(port)
    shared = (("lane", "shared"),)
    assert found[("nextstate_learner_steps_total",
                  (("lane", "shared"), ("outcome", "published")))] == 2
    assert found[("nextstate_learner_steps_total",
                  (("lane", "shared"), ("outcome", "refused")))] == 1
    assert found[("nextstate_learner_publishes_total", shared)] == 2
    assert found[("nextstate_learner_gate_events_total", (("event", "refused"),))] == 1
    assert found[("nextstate_learner_gate_events_total", (("event", "retried"),))] == 1
    assert found[("nextstate_learner_step_kl", shared)] == 3.2  # the last step's
    assert found[("nextstate_learner_turns", (("state", "trained"),))] == 8
    assert found[("nextstate_learner_turns", (("state", "ready"),))] == 3
    assert found[("nextstate_learner_rewards", (("score", "-1"),))] == 4
    assert found[("nextstate_learner_judged_total", ())] == 12
    assert found[("nextstate_learner_adapter_version", ())] == 2
    assert found[("nextstate_learner_state", (("state", "idle"),))] == 1
    assert found[("nextstate_learner_state", (("state", "training"),))] == 0
    assert found[("nextstate_learner_health", (("state", "learning"),))] == 1


def test_a_personal_step_counts_in_its_own_lane(served):
    metrics, port = served
    tell([metrics], REPORT, {**step("published", 3), "user": "team:alice"})
    found = scrape(port)
    assert found[("nextstate_learner_publishes_total", (("lane", "personal"),))] == 1
    assert ("nextstate_learner_publishes_total", (("lane", "shared"),)) not in found


def test_an_observer_that_fails_stops_neither_the_others_nor_the_learner(served):
    metrics, port = served

    class Broken:
        def step(self, step, report):
            raise RuntimeError("disk full")

        def round(self, report):
            raise RuntimeError("disk full")

        def close(self):
            pass

    tell([Broken(), metrics], REPORT, step("published", 1))
    assert scrape(port)[("nextstate_learner_publishes_total", (("lane", "shared"),))] == 1
