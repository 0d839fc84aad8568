"""A vLLM that wants a key: every call the proxy makes to it sends the backend's key
(relayed requests, health, adapter checks and reloads, rollback, a tenant's unloads,
forwarded endpoints), against a fake that refuses any call without it."""

from __future__ import annotations

import pytest

from tests.proxy.fake_vllm import MAX_MODEL_LEN, PROMPT_IDS, FakeVLLM
from tests.proxy.test_app import CHAT, KEYS, ROOT, open_client, publish_adapter, wait_for_router


@pytest.fixture
def keyed():
    fake = FakeVLLM(api_key="backend-key")
    yield fake
    assert fake.unauthorized == []  # not one call without the key


def test_serving_an_adapter_vllm_lost_sends_the_key_throughout(tmp_path, keyed):
    with open_client(tmp_path, keyed, policy="toy", adapter_poll_seconds=0.02,
                     backend_api_key="backend-key") as c:
        name = publish_adapter(tmp_path, "toy", 3)
        wait_for_router(c, name)
        whole = c.post("/v1/chat/completions", json={**CHAT, "model": "toy"})
        stream = c.post("/v1/chat/completions", json={**CHAT, "model": "toy", "stream": True})
        health = c.get("/health").json()
        models = c.get("/v1/models").json()
        tokens = c.post("/tokenize", json={"model": "toy", "prompt": "hi"}).json()
    assert whole.status_code == stream.status_code == 200
    assert health["status"] == "ok"
    # The model list came through (the versions in it are hidden from clients).
    assert {m["id"] for m in models["data"]} == {"toy"} and tokens["tokens"]
    assert [path for path, _ in keyed.admin] == ["/v1/load_lora_adapter"]  # loaded once
    assert [r["model"] for r in keyed.requests] == [name, name]


def test_rollback_and_forgetting_a_tenant_send_the_key(tmp_path, keyed):
    from nextstate.core.lora import personal_policy

    with open_client(tmp_path, keyed, policy="toy", adapter_poll_seconds=0.02,
                     backend_api_key="backend-key", **KEYS) as c:
        first = publish_adapter(tmp_path, "toy", 1)
        bobs = publish_adapter(tmp_path, personal_policy("toy", "bob"), 2)
        publish_adapter(tmp_path, "toy", 3)
        keyed.loaded.add(bobs)
        back = c.post("/v1/adapters/rollback", json={"version": 1}, headers=ROOT)
        wait_for_router(c, first)
        deleted = c.delete("/v1/tenants/bob", headers=ROOT).json()
    assert back.status_code == 200 and deleted["adapters"] == [bobs]
    assert ("/v1/load_lora_adapter", {"lora_name": first,
                                      "lora_path": f"/adapters/{first}"}) in keyed.admin
    assert ("/v1/unload_lora_adapter", {"lora_name": bobs}) in keyed.admin
    assert bobs not in keyed.loaded


def test_without_the_key_the_backend_refuses_and_the_proxy_says_so(tmp_path):
    """The fake is keyed, the proxy is not told the key: vLLM's 401 reaches the client
    untouched (never a 500), and the proxy cannot load adapters there."""
    fake = FakeVLLM(api_key="backend-key")
    with open_client(tmp_path, fake, policy="toy", adapter_poll_seconds=0.02) as c:
        wait_for_router(c, publish_adapter(tmp_path, "toy", 1))
        answer = c.post("/v1/chat/completions", json={**CHAT, "model": "toy"})
        rollback = c.post("/v1/adapters/rollback", json={"version": 1})
    assert answer.status_code == 401
    assert rollback.status_code == 502 and "401" in rollback.json()["error"]["message"]
    assert fake.loaded == set() and fake.unauthorized


def test_the_dialect_routes_ask_vllm_with_the_key(tmp_path, keyed):
    """Responses asks the server's context length for its echo, Messages relays: both
    with the key (the keyed fixture fails on any call without it)."""
    with open_client(tmp_path, keyed, backend_api_key="backend-key") as c:
        response = c.post("/v1/responses", json={"model": "toy", "input": "hi"})
        message = c.post("/v1/messages", json={
            "model": "toy", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == message.status_code == 200
    # The default max_output_tokens is what the context has left after the prompt.
    assert response.json()["max_output_tokens"] == MAX_MODEL_LEN - len(PROMPT_IDS)
