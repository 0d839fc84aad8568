"""A vLLM that is never open: started with a key, it serves the whole stack through it
(proxy, learner, CLI -> vLLM) and refuses everyone else, on every path but /health.

One vLLM of its own, started with a key (~30-60 s), for the whole module.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import replace

import httpx
import pytest
from click.testing import CliRunner

from nextstate.cli import main
from nextstate.core.vllm_server import VLLMProcess, toy_model_config
from nextstate.experiment.converse import converse
from nextstate.learner.process import Learner, LearnerConfig
from nextstate.learner.trainer import TrainerConfig
from nextstate.learner.training import TrainingConfig
from tests.conftest import MODEL_NAME, _require_vllm
from tests.integration.test_learner_training import ASK

pytestmark = pytest.mark.integration
KEY = secrets.token_urlsafe(32)
AS_KEYED = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def keyed_vllm(toy_model, tmp_path_factory):
    _require_vllm()
    log = tmp_path_factory.mktemp("keyed-vllm") / "vllm.log"
    with VLLMProcess(toy_model_config(toy_model, MODEL_NAME, log_path=log,
                                      api_key=KEY)) as server:
        yield server


def served_by(vllm) -> set[str]:
    answer = httpx.get(f"{vllm.url}/v1/models", headers=AS_KEYED, timeout=10)
    answer.raise_for_status()
    return {m["id"] for m in answer.json()["data"]}


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": "/tmp/evil"}),
    ("POST", "/v1/unload_lora_adapter", {"lora_name": "evil"}),
    ("POST", "/adapters", {"name": "evil", "src": "/tmp/evil"}),  # SageMaker's loader
    ("DELETE", "/adapters/evil", None),
    ("GET", "/v1/models", None), ("POST", "/tokenize", {"model": MODEL_NAME, "prompt": "x"}),
    ("POST", "/invocations", {"model": MODEL_NAME, "prompt": "x", "max_tokens": 1}),
    ("GET", "/metrics", None), ("GET", "/version", None)])
def test_the_keyed_vllm_refuses_whoever_lacks_the_key(keyed_vllm, method, path, body):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        answer = httpx.request(method, f"{keyed_vllm.url}{path}", json=body, headers=headers,
                               timeout=30)
        assert answer.status_code == 401, (path, answer.text)
    assert httpx.get(f"{keyed_vllm.url}/health", timeout=10).status_code == 200


async def test_proxy_and_learner_serve_publish_roll_back_and_forget_through_the_key(
        keyed_vllm, start_proxy, toy_model, tmp_path):
    vllm = keyed_vllm
    proxy = start_proxy(vllm.url, policy=MODEL_NAME, adapter_poll_seconds=0.1,
                        backend_api_key=KEY)
    # Chat and the other inference endpoints, through the proxy's key.
    async with httpx.AsyncClient(base_url=proxy.base_url, timeout=120) as client:
        chat = await client.post("/chat/completions", json={
            **ASK, "messages": [{"role": "user", "content": "Hi"}]})
        models = await client.get("/models")
        tokens = await client.post(f"{proxy.url}/tokenize", json={"model": MODEL_NAME,
                                                                  "prompt": "Hi"})
        health = (await client.get(f"{proxy.url}/health")).json()
    assert chat.status_code == 200 and chat.json()["model"] == MODEL_NAME
    assert MODEL_NAME in {m["id"] for m in models.json()["data"]} and tokens.json()["tokens"]
    assert health["status"] == "ok"

    # The learner judges (teacher logprobs for hints), trains and publishes.
    converse(proxy.base_url, 8)
    converse(proxy.base_url, 4, 20, user="alice")
    proxy.turns(25)
    learner = Learner(LearnerConfig(
        store_url=proxy.settings.resolved_store_url(), backends=(vllm.url,),
        backend_api_key=KEY, base_model=MODEL_NAME, model_dir=toy_model,
        adapters_dir=tmp_path / "adapters",
        training=TrainingConfig(trainer=replace(TrainerConfig(), batch_turns=4),
                                personal_min_turns=4, unload_grace=0.0)))
    try:
        for _ in range(8):
            if not await learner.step():
                break
        status = learner.status()
        versions = learner.store.adapters.versions()
        judgments = [learner.store.judgments.get(t["turn_id"]) for t in proxy.turns(25)]
        await serves_the_policy(vllm, proxy, status)
        await rolls_back(vllm, proxy, versions)
        await forgets_alice(vllm, proxy, learner, status)
    finally:
        await learner.close()
    assert status["totals"]["judge_failures"] == 0, status["totals"]
    assert any(j and j["teacher_logprobs"] for j in judgments)  # /tokenize + scoring
    assert [s["outcome"] for s in status["steps"]] == ["published"] * len(status["steps"])

    # The same vLLM, asked without the key: nothing.
    refused = httpx.post(f"{vllm.url}/v1/load_lora_adapter", timeout=30, json={
        "lora_name": "evil", "lora_path": str(tmp_path / "adapters" / versions[0]["name"])})
    assert refused.status_code == 401
    assert "evil" not in served_by(vllm)


async def ask(proxy, user: str | None = None) -> httpx.Response:
    async with httpx.AsyncClient(base_url=proxy.base_url, timeout=120) as client:
        answer = await client.post("/chat/completions", headers={
            "X-NextState-User": user} if user else {}, json={
            **ASK, "messages": [{"role": "user", "content": "Hello again"}]})
    answer.raise_for_status()
    return answer


async def serves_the_policy(vllm, proxy, status) -> None:
    shared, alices = status["adapter"]["name"], status["personal"]["alice"]
    assert shared.startswith(f"{MODEL_NAME}@") and alices.startswith(f"{MODEL_NAME}~alice@")
    assert {shared, alices} <= served_by(vllm)
    await asyncio.sleep(0.5)  # the proxy follows the store
    await ask(proxy)
    await ask(proxy, "alice")
    rows = proxy.turns(27)[-2:]
    assert [r["served_model"] for r in rows] == [shared, alices]


async def rolls_back(vllm, proxy, versions) -> None:
    """To the first shared version (unloaded by now: loaded again, with the key) through
    the proxy's admin endpoint; then forward again with ``nextstate adapters rollback``."""
    shared = [v for v in versions if v["policy"] == MODEL_NAME]
    first, newest = shared[0], shared[-1]
    assert first["name"] != newest["name"] and first["name"] not in served_by(vllm)
    async with httpx.AsyncClient(base_url=proxy.base_url, timeout=120) as client:
        back = await client.post("/adapters/rollback", json={"version": first["version"]})
    assert back.status_code == 200, back.text
    assert first["name"] in served_by(vllm)
    await asyncio.sleep(0.5)
    await ask(proxy)
    assert proxy.turns(28)[-1]["served_model"] == first["name"]
    result = await asyncio.to_thread(CliRunner().invoke, main, [
        "adapters", "rollback", str(newest["version"]), "--backend", vllm.url,
        "--store", proxy.settings.resolved_store_url()], env={"NEXTSTATE_BACKEND_API_KEY": KEY})
    assert result.exit_code == 0, result.output
    await asyncio.sleep(0.5)
    await ask(proxy)
    assert proxy.turns(29)[-1]["served_model"] == newest["name"]


async def forgets_alice(vllm, proxy, learner, status) -> None:
    alices = status["personal"]["alice"]
    result = await asyncio.to_thread(CliRunner().invoke, main, [
        "forget", "--store", proxy.settings.resolved_store_url(), "--user", "alice",
        "--backend", vllm.url, "--backend-api-key", KEY])
    assert result.exit_code == 0, result.output
    assert f"unloaded from {vllm.url}: {alices}" in result.output
    await learner.step()  # its housekeeping must not load her adapter again
    assert alices not in served_by(vllm)
    await asyncio.sleep(0.5)
    await ask(proxy, "alice")
    assert proxy.turns(1, user="alice")[-1]["served_model"] == status["adapter"]["name"]
