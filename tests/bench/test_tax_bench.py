"""The tax benchmark's arithmetic: each arm against `direct` in the same round, with a
95% interval that narrows as rounds agree (the runs themselves need vLLM and minutes;
`python -m bench.tax_bench --quick` is the smoke run)."""

from __future__ import annotations

import argparse

import pytest

from bench.tax_bench import ARMS, Sample, arms, body, ratio, render, render_recompute
from nextstate.proxy.capture import recomputable


def sample(arm: str, rnd: int, seconds: float, api: float = 0.01) -> Sample:
    return Sample(arm, 256, True, 1, rnd, seconds=seconds, ttfb=0.05, gap=seconds / 255,
                  cpu={"vllm_api": api, "vllm_engine": 2 * seconds, "proxy": 0.001})


def test_the_ratio_pairs_rounds_and_its_interval_holds_the_truth() -> None:
    # Every round 10% slower than that round's direct run, whatever the round's speed.
    rounds = [(r, 1.0 + 0.3 * (r % 3)) for r in range(6)]
    samples = [s for r, base in rounds for s in (sample("direct", r, base),
                                                  sample("capture", r, 1.1 * base))]
    mid, low, high = ratio(samples, "capture", "seconds")
    assert mid == pytest.approx(1.1) and low == pytest.approx(1.1) == high
    noisy = samples + [sample("proxy", r, base * (1.05 if r % 2 else 1.15))
                       for r, base in rounds]
    mid, low, high = ratio(noisy, "proxy", "seconds")
    assert low < 1.1 < high and mid == pytest.approx((1.05 * 1.15) ** 0.5, rel=1e-3)
    assert ratio(samples, "proxy", "seconds") is None  # no such arm


def test_the_report_has_a_row_per_arm_and_the_capture_fields_are_what_the_proxy_asks() -> None:
    samples = [s for r in range(3) for s in (sample("direct", r, 1.0),
                                             sample("ids", r, 1.0),
                                             sample("capture", r, 1.2, api=0.02),
                                             sample("proxy", r, 1.25, api=0.02))]
    args = argparse.Namespace(tokens=[256], concurrency=[1])
    report = render([s for s in samples if s.stream] + [
        Sample(s.arm, 256, False, 1, s.round, s.seconds, s.ttfb, None, s.cpu)
        for s in samples], args, "test")
    rows = [line for line in report.splitlines() if line.startswith("| 256 |")]
    assert len(rows) == 6  # (ids, capture, proxy) x (whole, stream)
    assert "| 256 | stream | 1 | capture | +20.0% [+20.0, +20.0]" in report
    assert body("capture", 8, True) == {
        "model": "nextstate-toy", "temperature": 0, "max_tokens": 8, "ignore_eos": True,
        "stream": True, "messages": [{"role": "user", "content": "Tell me a long story."}],
        "return_token_ids": True, "logprobs": True, "stream_options": {"include_usage": True}}


def test_the_recompute_arm_sends_requests_whose_logprobs_can_be_left_out() -> None:
    # Otherwise the arm would measure the proxy asking for logprobs after all.
    assert recomputable(body("direct", 8, True))


def test_the_learners_cost_is_set_beside_the_vllm_cpu_it_saved() -> None:
    samples = [Sample(arm, 256, False, 1, r, 1.0, 0.05, None,
                      {"vllm_api": api, "vllm_engine": 0.5, "proxy": 0.001})
               for r in range(3) for arm, api in (("ids", 0.1), ("capture", 0.25))]
    report = render_recompute({256: (40.0, 35.0)}, samples)
    assert "| 256 | 40.0 | 35.0 | 150.0 |" in report


def test_arms_keep_their_order_and_always_run_direct() -> None:
    assert arms("recompute, proxy") == ("direct", "proxy", "recompute")
    assert arms(",".join(ARMS)) == ARMS
    with pytest.raises(argparse.ArgumentTypeError, match="unknown arm"):
        arms("direct,fast")
