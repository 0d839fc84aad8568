"""Learner faults with the real components: killed (kill -9) mid-judge, mid-training-step,
mid-publish and at random points; a judge that is down or answers garbage; an adapter
vLLM refuses. After a kill, every turn is judged once and trained once, and the version
current is one vLLM has."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from nextstate.core.store import Store
from nextstate.core.vllm_server import spawn, stop_group
from nextstate.experiment.converse import converse
from nextstate.learner.judging import JudgingConfig
from nextstate.learner.process import Learner, LearnerConfig
from nextstate.learner.trainer import Trainer, TrainerConfig
from nextstate.learner.training import TrainingConfig
from tests.conftest import MODEL_NAME
from tests.integration.relay import Relay
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
    command = [sys.executable, "-m", "nextstate.cli", "learn", "--backend", vllm.url,
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
        store_url=store_url, backends=(vllm.url,), base_model=MODEL_NAME,
        model_dir=toy_model, adapters_dir=tmp_path / "adapters",
        training=TrainingConfig(trainer=replace(TrainerConfig(), batch_turns=2))))
    try:
        await drain(learner, rounds=20)
        store = learner.store
        judged = [store.judgments.get(t["turn_id"]) for t in turns if t["turn_type"] == "main"]
        versions = {a["version"]: a for a in store.adapters.versions(MODEL_NAME)}
        current = store.adapters.current(MODEL_NAME)
        counts = store.judgments.counts()
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
            store_url=store_url, backends=(vllm.url,), base_model=MODEL_NAME,
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
    learner = Learner(LearnerConfig(store_url=store_url, backends=(vllm.url,),
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
        store_url=store_url, backends=(vllm.url,), base_model=MODEL_NAME,
        model_dir=toy_model, adapters_dir=tmp_path / "adapters",
        training=TrainingConfig(trainer=replace(TrainerConfig(), batch_turns=2))))
    try:
        await drain(learner, rounds=3)
        status = learner.status()
        versions = learner.store.adapters.versions(MODEL_NAME)
    finally:
        await learner.close()
    assert versions and all(v["status"] == "failed" for v in versions)
    assert status["adapter"] is None and status["counts"]["trained"] == 0
    assert any("refused" in e for e in status["totals"]["recent_errors"])
    answer = httpx.post(f"{policy_proxy.base_url}/chat/completions", timeout=60, json={
        "model": MODEL_NAME, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 200  # the base model keeps serving the policy
    assert policy_proxy.turns(5)[-1]["served_model"] == MODEL_NAME


# -- kill -9 at each stage ---------------------------------------------------------------------

def learn(store_url: str, backend: str, toy_model: Path, home: Path, log: Path,
          *extra: str):
    """``nextstate learn`` as its own process (batches of 4 judged turns)."""
    return spawn([sys.executable, "-m", "nextstate.cli", "learn", "--backend", backend,
                  "--model", MODEL_NAME, "--model-dir", str(toy_model), "--store", store_url,
                  "--batch-turns", "4", *extra], log,
                 env={**os.environ, "NEXTSTATE_HOME": str(home)})


def kill(process) -> None:
    process.send_signal(signal.SIGKILL)
    stop_group(process)  # (its process group: nothing of it is left running)
    assert process.wait(10) == -signal.SIGKILL


async def until(condition: Callable[[], object], what: str, timeout: float = 240,
                poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(poll)


def recorded_turns(proxy) -> tuple[str, list[dict]]:
    """8 two-turn sessions; the first turn of each is corrected (a hint: a teacher call)."""
    converse(proxy.base_url, 8)
    return proxy.settings.resolved_store_url(), proxy.turns(16)


def judged_rows(store: Store, turns: list[dict]) -> dict[str, tuple]:
    rows = {t["turn_id"]: store.judgments.get(t["turn_id"]) for t in turns}
    return {k: (r["status"], r["updated_at"], r["attempts"]) for k, r in rows.items() if r}


def check_serving(store: Store, vllm_url: str, proxy,
                  loaded: tuple[str, ...] = ("current", "previous")) -> None:
    """One current version (if any): on disk, loaded in vLLM, and the proxy serves it;
    vLLM has no version of another status than ``loaded``."""
    versions = store.adapters.versions(MODEL_NAME)
    current = [v for v in versions if v["status"] == "current"]
    assert len(current) <= 1
    models = {m["id"] for m in httpx.get(f"{vllm_url}/v1/models").json()["data"]}
    for v in versions:
        if v["name"] in models:
            assert v["status"] in loaded, v
    if current:
        assert current[0]["name"] in models and Path(current[0]["path"]).exists()
    answer = httpx.post(f"{proxy.base_url}/chat/completions", timeout=60, json={
        "model": MODEL_NAME, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 200, answer.text


def check_trained_once(store: Store, turns: list[dict]) -> None:
    """Every turn with a signal trained by a published version; and each published
    version's weights went through exactly the optimizer steps of the versions before it
    and its own (a step of a killed learner never carries over)."""
    import torch

    published = {v["version"]: v for v in store.adapters.versions(MODEL_NAME)
                 if v["status"] in ("current", "previous", "unloaded")}
    signal_turns = [t for t in turns if t["turn_index"] == 0]
    for t in signal_turns:
        assert store.judgments.get(t["turn_id"])["trained_version"] in published, t["turn_id"]
    passes = TrainerConfig().passes
    for i, version in enumerate(sorted(published), start=1):
        state = torch.load(Path(published[version]["path"]) / "optimizer.pt")["state"]
        steps = {int(s["step"]) for s in state.values()}
        assert steps == {i * passes}, (version, steps)


async def test_a_learner_killed_mid_judge_judges_each_turn_once(vllm, policy_proxy, toy_model,
                                                                tmp_path):
    store_url, turns = recorded_turns(policy_proxy)
    store = Store(store_url)
    with Relay(vllm.url) as relay:
        # Held: a teacher call, once two hinted turns were judged (others wait, in flight).
        relay.hold(lambda method, path: "before" if path == "/v1/completions"
                   and store.judgments.reward_stats()["with_hints"] >= 2 else None)
        learner = learn(store_url, relay.url, toy_model, tmp_path, tmp_path / "l1.log",
                        "--no-train")
        await until(relay.held.is_set, "the learner mid-judge")
        kill(learner)
    before = judged_rows(store, turns)
    assert 2 <= sum(s == "ok" for s, _, _ in before.values()) < 16  # it was mid-judge
    learner = learn(store_url, vllm.url, toy_model, tmp_path, tmp_path / "l2.log", "--no-train")
    try:
        await until(lambda: store.judgments.counts()["awaiting_judgment"] == 0, "the rest judged")
    finally:
        kill(learner)
    after = judged_rows(store, turns)
    assert len(after) == 16 and all(s == "ok" for s, _, _ in after.values())
    for turn_id, row in before.items():
        if row[0] == "ok":
            assert after[turn_id] == row  # judged before the kill: never again
    store.close()


async def test_a_learner_killed_mid_training_step_trains_each_turn_once(
        vllm, policy_proxy, toy_model, tmp_path):
    store_url, turns = recorded_turns(policy_proxy)
    store = Store(store_url)
    log = tmp_path / "l1.log"
    learner = learn(store_url, vllm.url, toy_model, tmp_path, log)
    await until(lambda: "training nextstate-toy" in log.read_text(), "a training step",
                poll=0.005)
    kill(learner)
    assert "trained nextstate-toy" not in log.read_text()  # killed inside the step
    assert store.adapters.versions(MODEL_NAME) == []
    check_serving(store, vllm.url, policy_proxy)
    learner = learn(store_url, vllm.url, toy_model, tmp_path, tmp_path / "l2.log")
    try:
        await until(lambda: store.judgments.trained_count() == 8,
                    "every turn with a signal trained")
    finally:
        kill(learner)
    check_trained_once(store, turns)
    check_serving(store, vllm.url, policy_proxy)
    store.close()


@pytest.mark.parametrize("when", ["before", "after"],
                         ids=["before-vllm-loads-it", "after-vllm-loaded-it"])
async def test_a_learner_killed_mid_publish_leaves_no_version_current_that_vllm_lacks(
        vllm, policy_proxy, toy_model, tmp_path, when):
    store_url, turns = recorded_turns(policy_proxy)
    store = Store(store_url)
    with Relay(vllm.url) as relay:
        relay.hold(lambda method, path: when if path == "/v1/load_lora_adapter" else None)
        learner = learn(store_url, relay.url, toy_model, tmp_path, tmp_path / "l1.log")
        await until(relay.held.is_set, "the learner mid-publish")
        kill(learner)
    [staged] = store.adapters.versions(MODEL_NAME)
    assert staged["status"] == "staged"  # written and named, never made current
    # (vLLM may have it, but nothing is routed to a version that is not current.)
    check_serving(store, vllm.url, policy_proxy, loaded=("staged",))
    learner = learn(store_url, vllm.url, toy_model, tmp_path, tmp_path / "l2.log")
    try:
        await until(lambda: store.judgments.trained_count() == 8,
                    "every turn with a signal trained")
        await until(lambda: staged["name"] not in {m["id"] for m in httpx.get(
            f"{vllm.url}/v1/models").json()["data"]}, "the abandoned version unloaded")
    finally:
        kill(learner)
    versions = {v["version"]: v for v in store.adapters.versions(MODEL_NAME)}
    assert versions[staged["version"]]["status"] == "abandoned"
    check_trained_once(store, turns)
    check_serving(store, vllm.url, policy_proxy)
    store.close()
