"""Learner faults with the real components: killed at random points, a judge that is down
or answers garbage, an adapter vLLM refuses."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from bench.vllm_bench import converse
from nextstate.learner.judging import JudgingConfig
from nextstate.learner.process import Learner, LearnerConfig
from nextstate.learner.trainer import Trainer, TrainerConfig
from nextstate.learner.training import TrainingConfig
from nextstate.proxy.backend import spawn, stop_group
from tests.conftest import MODEL_NAME
from tests.integration.test_learner_training import drain

pytestmark = pytest.mark.integration


@pytest.fixture
def policy_proxy(vllm, start_proxy):
    return start_proxy(vllm.url, policy=MODEL_NAME, adapter_poll_seconds=0.1)


async def test_a_learner_killed_at_random_moments_judges_and_trains_each_turn_once(
        vllm, policy_proxy, toy_model, tmp_path):
    proxy = policy_proxy
    converse(proxy.base_url, 8)
    turns = proxy.turns(16)
    store_url = proxy.settings.resolved_store_url()
    command = [sys.executable, "-m", "nextstate.proxy.cli", "learn", "--backend", vllm.url,
               "--model", MODEL_NAME, "--model-dir", str(toy_model), "--store", store_url,
               "--batch-turns", "2"]
    rng = random.Random(7)
    for i in range(4):  # start, let it work a random while, kill -9
        process = spawn(command, tmp_path / f"learner{i}.log",
                        env={**os.environ, "NEXTSTATE_HOME": str(tmp_path)})
        await asyncio.sleep(rng.uniform(4.0, 12.0))
        process.send_signal(signal.SIGKILL)
        stop_group(process)

    learner = Learner(LearnerConfig(
        store_url=store_url, backend_url=vllm.url, base_model=MODEL_NAME,
        model_dir=toy_model, adapters_dir=tmp_path / "adapters",
        training=TrainingConfig(trainer=replace(TrainerConfig(), batch_turns=2))))
    try:
        await drain(learner, rounds=20)
        store = learner.store
        judged = [store.judgment(t["turn_id"]) for t in turns if t["turn_type"] == "main"]
        versions = {a["version"]: a for a in store.adapters(MODEL_NAME)}
        current = store.current_adapter(MODEL_NAME)
        counts = store.counts()
    finally:
        await learner.close()
    # Every turn with a next state has exactly one judgment, which is done.
    assert all(j is not None and j["status"] == "ok" for j in judged)
    assert counts["awaiting_judgment"] == 0
    # Each trained turn names one version that really was published (never one a
    # killed learner left staged), and every turn with a signal got trained.
    for j in judged:
        if j["score"] in (1, -1):
            assert j["trained_version"] in versions, j
            assert versions[j["trained_version"]]["status"] in ("current", "previous",
                                                                "unloaded")
    # One consistent current version, on disk and loaded in vLLM.
    assert current is not None
    assert sum(a["status"] == "current" for a in versions.values()) == 1
    assert Path(current["path"]).exists()
    models = {m["id"] for m in httpx.get(f"{vllm.url}/v1/models").json()["data"]}
    assert current["name"] in models


async def test_a_judge_that_is_down_or_answers_garbage_leaves_turns_for_later(
        vllm, policy_proxy, tmp_path):
    converse(policy_proxy.base_url, 2)
    policy_proxy.turns(4)
    store_url = policy_proxy.settings.resolved_store_url()
    retry_now = JudgingConfig(retry_after=0.0)
    for judge_api, why in (("http://127.0.0.1:9/v1", "every judge call failed"),  # down
                           (f"{vllm.url}/v1", "malformed")):  # the untrained toy: garbage
        learner = Learner(LearnerConfig(
            store_url=store_url, backend_url=vllm.url, base_model=MODEL_NAME,
            judge="llm", judge_model=f"hosted_vllm/{MODEL_NAME}", judge_api_base=judge_api,
            judging=retry_now))
        learner.judge.retries = 0
        try:
            await learner.step()  # does not raise
            status = learner.status()
        finally:
            await learner.close()
        # The turn with explicit feedback is judged by it; the other waits, with why.
        assert status["counts"]["judge_errors"] == 1
        assert status["rewards"]["from_feedback"] == 1
        errors = status["totals"]["recent_errors"]
        assert errors and all("JudgeError" in e and why in e for e in errors), errors
    # A working judge later picks them up: nothing was lost.
    learner = Learner(LearnerConfig(store_url=store_url, backend_url=vllm.url,
                                    base_model=MODEL_NAME, judging=retry_now))
    try:
        await learner.step()
        assert learner.status()["counts"]["judge_errors"] == 0
    finally:
        await learner.close()


async def test_an_adapter_vllm_refuses_is_reported_and_the_previous_keeps_serving(
        vllm, policy_proxy, toy_model, tmp_path, monkeypatch):
    converse(policy_proxy.base_url, 2)
    policy_proxy.turns(4)
    store_url = policy_proxy.settings.resolved_store_url()
    save = Trainer.save

    def save_without_weights(self, directory, stats=None):
        """An adapter directory vLLM cannot load (its weights file is missing)."""
        out = save(self, directory, stats)
        (out / "adapter_model.safetensors").unlink()
        return out

    monkeypatch.setattr(Trainer, "save", save_without_weights)
    learner = Learner(LearnerConfig(
        store_url=store_url, backend_url=vllm.url, base_model=MODEL_NAME,
        model_dir=toy_model, adapters_dir=tmp_path / "adapters",
        training=TrainingConfig(trainer=replace(TrainerConfig(), batch_turns=2))))
    try:
        await drain(learner, rounds=3)
        status = learner.status()
        versions = learner.store.adapters(MODEL_NAME)
    finally:
        await learner.close()
    assert versions and all(v["status"] == "failed" for v in versions)
    assert status["adapter"] is None and status["counts"]["trained"] == 0
    assert any("refused" in e for e in status["totals"]["recent_errors"])
    answer = httpx.post(f"{policy_proxy.base_url}/chat/completions", timeout=60, json={
        "model": MODEL_NAME, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 200  # the base model keeps serving the policy
    assert policy_proxy.turns(5)[-1]["served_model"] == MODEL_NAME
