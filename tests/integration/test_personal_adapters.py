"""Personal adapters against the real vLLM: users' own adapters trained, published and
served side by side on one base model, everyone else on the shared one, and a forgotten
user's adapter gone from vLLM and from disk
(users -> proxy -> vLLM -> store -> learner -> personal adapters -> vLLM -> proxy)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import httpx
import pytest
from click.testing import CliRunner

from nextstate.cli import main
from nextstate.experiment.converse import converse
from nextstate.learner.process import Learner, LearnerConfig
from nextstate.learner.trainer import TrainerConfig
from nextstate.learner.training import TrainingConfig
from tests.conftest import MODEL_NAME
from tests.integration.test_learner_training import ASK

pytestmark = pytest.mark.integration


async def ask_as(client: httpx.AsyncClient, user: str) -> httpx.Response:
    answer = await client.post("/chat/completions", headers={"X-NextState-User": user},
                               json={**ASK, "temperature": 0.0, "logprobs": True,
                                     "messages": [{"role": "user", "content": "Hi there"}]})
    answer.raise_for_status()
    return answer


def served_by(vllm) -> set[str]:
    return {m["id"] for m in httpx.get(f"{vllm.url}/v1/models").json()["data"]}


async def test_users_get_their_own_adapters_side_by_side_and_others_the_shared_one(
        vllm, start_proxy, toy_model, tmp_path):
    proxy = start_proxy(vllm.url, policy=MODEL_NAME, adapter_poll_seconds=0.1)
    converse(proxy.base_url, 4, 0, user="alice", feedback=False)
    converse(proxy.base_url, 4, 10, user="bob", feedback=False)
    # Too few turns for an adapter of her own:
    converse(proxy.base_url, 2, 20, user="carol", feedback=False)
    converse(proxy.base_url, 2, 30, feedback=False)
    proxy.turns(24)
    learner = Learner(LearnerConfig(
        store_url=proxy.settings.resolved_store_url(), backends=(vllm.url,),
        base_model=MODEL_NAME, model_dir=toy_model, adapters_dir=tmp_path / "adapters",
        training=TrainingConfig(trainer=replace(TrainerConfig(), batch_turns=4),
                                personal_min_turns=4, unload_grace=0.0)))
    try:
        for _ in range(6):
            if not await learner.step():
                break
        status = learner.status()
        await served_side_by_side(vllm, proxy, status)
        await forgotten_users_adapter_goes(vllm, proxy, learner, status, tmp_path)
    finally:
        await learner.close()


async def served_side_by_side(vllm, proxy, status) -> None:
    shared, alice, bob = (status["adapter"]["name"], status["personal"]["alice"],
                          status["personal"]["bob"])
    assert shared.startswith(f"{MODEL_NAME}@")
    assert alice.startswith(f"{MODEL_NAME}~alice@") and bob.startswith(f"{MODEL_NAME}~bob@")
    assert set(status["personal"]) == {"alice", "bob"}
    assert {shared, alice, bob} <= served_by(vllm)  # one base model, three adapters loaded

    async with httpx.AsyncClient(base_url=proxy.base_url, timeout=60) as client:
        await asyncio.sleep(0.5)  # the proxy follows the store
        assert (await client.get("/learner/status")).json()["serving_personal"] == {
            f"{MODEL_NAME}~alice": alice, f"{MODEL_NAME}~bob": bob}
        answers = await asyncio.gather(*(ask_as(client, u) for u in ("alice", "bob", "carol")))
        # vLLM lost alice's adapter (an eviction, a restart): the proxy loads it again.
        httpx.post(f"{vllm.url}/v1/unload_lora_adapter", json={"lora_name": alice})
        again = await ask_as(client, "alice")
    assert {a.json()["model"] for a in [*answers, again]} == {MODEL_NAME}
    rows = proxy.turns(28)[-4:]
    by_user = {r["user"]: r["served_model"] for r in rows}
    assert by_user == {"alice": alice, "bob": bob, "carol": shared}
    # Different weights answer: the same prompt at temperature 0 scores differently.
    logprobs = [[t["logprob"] for t in a.json()["choices"][0]["logprobs"]["content"]]
                for a in answers]
    assert logprobs[0] != logprobs[1] != logprobs[2]


async def forgotten_users_adapter_goes(vllm, proxy, learner, status, tmp_path) -> None:
    """``nextstate forget --user alice``: her adapter is unloaded from vLLM and deleted,
    the learner does not load it again, and she is served the shared adapter."""
    shared, alice, bob = (status["adapter"]["name"], status["personal"]["alice"],
                          status["personal"]["bob"])
    result = await asyncio.to_thread(CliRunner().invoke, main, [
        "forget", "--store", proxy.settings.resolved_store_url(), "--user", "alice",
        "--backend", vllm.url])
    assert result.exit_code == 0, result.output
    assert "deleted 10 turns" in result.output and alice in result.output
    assert f"unloaded from {vllm.url}: " in result.output
    assert not (tmp_path / "adapters" / alice).exists()
    await learner.step()  # its housekeeping reloads lost current adapters, not this one
    served = served_by(vllm)
    assert alice not in served and not any("~alice@" in name for name in served)
    assert {shared, bob} <= served
    assert learner.status()["personal"] == {"bob": bob}
    async with httpx.AsyncClient(base_url=proxy.base_url, timeout=60) as client:
        await asyncio.sleep(0.5)  # the proxy follows the store
        answer = await ask_as(client, "alice")
    assert answer.json()["model"] == MODEL_NAME
    assert [r["served_model"] for r in proxy.turns(1, user="alice")] == [shared]
