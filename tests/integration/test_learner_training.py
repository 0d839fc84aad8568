"""Training and hot reload against the real vLLM
(proxy -> store -> learner -> trainer -> publish -> vLLM -> proxy)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

import httpx
import pytest

from nextstate.experiment.converse import converse
from nextstate.learner.process import Learner, LearnerConfig
from nextstate.learner.trainer import TrainerConfig
from nextstate.learner.training import TrainingConfig
from tests.conftest import MODEL_NAME

pytestmark = pytest.mark.integration
ASK = {"model": MODEL_NAME, "temperature": 1.0, "max_tokens": 12}
def learner_for(proxy, vllm, toy_model, tmp_path, unload_grace: float = 0.0,
                **training) -> Learner:
    trainer = replace(TrainerConfig(), batch_turns=4, **training)
    return Learner(LearnerConfig(
        store_url=proxy.settings.resolved_store_url(), backends=(vllm.url,),
        base_model=MODEL_NAME, model_dir=toy_model, adapters_dir=tmp_path / "adapters",
        training=TrainingConfig(trainer=trainer, unload_grace=unload_grace)))


async def drain(learner: Learner, rounds: int = 6) -> None:
    for _ in range(rounds):
        if not await learner.step():
            return


@pytest.fixture
def policy_proxy(vllm, start_proxy):
    return start_proxy(vllm.url, policy=MODEL_NAME, adapter_poll_seconds=0.1)


async def test_learner_publishes_versions_the_proxy_serves(vllm, policy_proxy, toy_model,
                                                           tmp_path):
    proxy = policy_proxy
    converse(proxy.base_url, 8)
    proxy.turns(16)
    # A grace longer than the proxy's poll (0.1 s): with none, the learner could unload a
    # version the proxy still took for current, and the proxy would load it again.
    learner = learner_for(proxy, vllm, toy_model, tmp_path, unload_grace=1.0)
    try:
        await drain(learner)
        await asyncio.sleep(1.5)
        await learner.training.housekeeping()  # past the grace: the old version goes
        versions = learner.store.adapters.versions()
        status = learner.status()
    finally:
        await learner.close()
    published = [v for v in versions if v["status"] in ("current", "previous", "unloaded")]
    assert len(published) >= 2
    current, before = versions[-1], versions[-2]
    assert current["status"] == "current" and current["name"].startswith(f"{MODEL_NAME}@")
    assert status["counts"]["trained"] == 8
    assert status["adapter"]["version"] == current["version"]
    assert len(status["steps"]) == 2 and all(s["outcome"] == "published"
                                             for s in status["steps"])

    # The proxy now sends the policy's name to the newest adapter; the client still
    # sees the name it asked for, and the record names the version.
    await asyncio.sleep(0.5)
    answer = httpx.post(f"{proxy.base_url}/chat/completions",
                        json={**ASK, "messages": [{"role": "user", "content": "Hi"}]},
                        timeout=60)
    assert answer.json()["model"] == MODEL_NAME
    newest = proxy.turns(17)[-1]
    assert newest["served_model"] == current["name"]
    status_answer = httpx.get(f"{proxy.base_url}/learner/status").json()
    assert status_answer["serving"] == current["name"]
    # Old versions left vLLM after their grace period; the current one is loaded.
    models = {m["id"] for m in httpx.get(f"{vllm.url}/v1/models").json()["data"]}
    assert current["name"] in models and before["name"] not in models


async def test_publishing_under_load_fails_no_request(vllm, policy_proxy, toy_model,
                                                      tmp_path):
    proxy = policy_proxy
    converse(proxy.base_url, 4)
    proxy.turns(8)
    stop = threading.Event()
    results: list[int] = []
    served: set[str] = set()

    def hammer() -> None:
        with httpx.Client(base_url=proxy.base_url, timeout=60) as client:
            while not stop.is_set():
                for stream in (False, True):
                    body = {**ASK, "max_tokens": 8, "stream": stream,
                            "messages": [{"role": "user", "content": "Load test"}]}
                    answer = client.post("/chat/completions", json=body)
                    results.append(answer.status_code)
                    if answer.status_code != 200:
                        stop.set()

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    learner = learner_for(proxy, vllm, toy_model, tmp_path)
    try:
        await drain(learner)
        await asyncio.sleep(1.0)  # keep the load on through the switch
        [adapter] = [a["name"] for a in learner.store.adapters.versions(MODEL_NAME)]
    finally:
        stop.set()
        for t in threads:
            t.join()
        await learner.close()
    served = {t["served_model"] for t in proxy.turns(0) if t["request"]["messages"][0][
        "content"] == "Load test"}
    assert results and set(results) == {200}, f"failed requests: {results}"
    assert adapter in served  # traffic really went through the new version


class Killed(BaseException):
    """Stands for the learner process being killed at this point."""


async def test_a_learner_killed_mid_publish_resumes_and_trains_nothing_twice(
        vllm, policy_proxy, toy_model, tmp_path):
    proxy = policy_proxy
    converse(proxy.base_url, 4)
    proxy.turns(8)
    learner = learner_for(proxy, vllm, toy_model, tmp_path)

    def die(*args, **kwargs):
        raise Killed

    learner.store.adapters.publish = die  # killed after vLLM loaded the adapter, before the commit
    with pytest.raises(Killed):
        await drain(learner)
    staged = learner.store.adapters.versions()
    await learner.close()
    assert [a["status"] for a in staged] == ["staged"]

    restarted = learner_for(proxy, vllm, toy_model, tmp_path)
    try:
        await drain(restarted)
        versions = restarted.store.adapters.versions()
        trained = [restarted.store.judgments.get(t["turn_id"])["trained_version"]
                   for t in proxy.turns(8) if t["turn_index"] == 0]
    finally:
        await restarted.close()
    assert [a["status"] for a in versions] == ["abandoned", "current"]
    published = versions[1]["version"]
    assert trained == [published] * 4  # each trained once, by the version published
    models = {m["id"] for m in httpx.get(f"{vllm.url}/v1/models").json()["data"]}
    assert versions[0]["name"] not in models  # vLLM had loaded it: unloaded, it never served
