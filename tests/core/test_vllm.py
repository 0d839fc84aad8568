"""The one client to vLLM (nextstate.core.vllm): the key on every call, timeouts,
retries of what is safe to retry, and vLLM's answers understood in one place."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from nextstate.core.vllm import VLLMClient, VLLMRefused, VLLMUnreachable
from tests.proxy.fake_vllm import PROMPT_IDS, FakeVLLM


def client_of(handler, key: str | None = "k", **options) -> VLLMClient:
    return VLLMClient("http://vllm", key, backoff=0.0, **options,
                      http=httpx.AsyncClient(transport=httpx.MockTransport(handler)))


async def test_every_call_sends_the_backends_key():
    fake = FakeVLLM(api_key="k")
    vllm = client_of(fake)
    assert await vllm.health()
    await vllm.load_adapter("p@000001", "/adapters/p@000001")
    assert "p@000001" in await vllm.models()
    assert await vllm.tokenize({"model": "toy", "prompt": "hi"}) == PROMPT_IDS
    assert (await vllm.completion({"model": "toy", "prompt": [1, 2], "max_tokens": 1}))[
        "choices"]
    assert await vllm.unload_adapter("p@000001")
    await vllm.aclose()
    assert fake.unauthorized == []  # (the fake refuses any call without the key)
    assert fake.headers[0]["authorization"] == "Bearer k"


async def test_without_the_key_vllm_refuses_and_says_so():
    vllm = client_of(FakeVLLM(api_key="k"), key="wrong")
    with pytest.raises(VLLMRefused) as refused:
        await vllm.models()
    assert refused.value.status == 401 and "http://vllm" in str(refused.value)


async def test_loading_what_is_loaded_and_unloading_what_is_not_are_no_errors():
    fake = FakeVLLM()
    vllm = client_of(fake, key=None)
    await vllm.load_adapter("a", "/a")
    await vllm.load_adapter("a", "/a")  # vLLM: "has already been loaded" (a 400)
    assert await vllm.unload_adapter("a") is True
    assert await vllm.unload_adapter("a") is False  # vLLM: "cannot be found" (a 404)
    assert [path for path, _ in fake.admin] == ["/v1/load_lora_adapter"] * 2 + [
        "/v1/unload_lora_adapter"] * 2


async def test_a_refused_load_is_an_error_with_vllms_message():
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"message": "No adapter found for /x"}})

    with pytest.raises(VLLMRefused, match="No adapter found"):
        await client_of(refuse).load_adapter("a", "/x")


async def test_no_answer_and_a_busy_backend_are_tried_again():
    calls: list[str] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) == 1:
            raise httpx.ConnectError("refused", request=request)
        if len(calls) == 2:
            return httpx.Response(503, text="busy")
        return httpx.Response(200, json={"data": [{"id": "toy"}]})

    assert await client_of(flaky, retries=2).models() == {"toy"}
    assert calls == ["/v1/models"] * 3


async def test_a_backend_that_never_answers_is_unreachable_after_the_retries():
    calls: list[str] = []

    def down(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        raise httpx.ConnectTimeout("timed out", request=request)

    with pytest.raises(VLLMUnreachable) as unreachable:
        await client_of(down, retries=1).load_adapter("a", "/a")
    assert unreachable.value.nothing_sent and len(calls) == 2

    def lost(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("no reply", request=request)

    with pytest.raises(VLLMUnreachable) as unreachable:
        await client_of(lost, retries=0).models()
    assert not unreachable.value.nothing_sent  # it may have arrived


async def test_an_error_is_not_retried_and_health_is_asked_once():
    calls: list[str] = []

    def bad(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/health":
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(400, json={"error": {"message": "bad prompt"}})

    with pytest.raises(VLLMRefused):
        await client_of(bad, retries=3).tokenize({"prompt": "x"})
    assert await client_of(bad, retries=3).health() is False  # never raises
    assert calls == ["/tokenize", "/health"]


async def test_every_call_has_a_timeout():
    seen: dict[str, dict] = {}

    def record(request: httpx.Request) -> httpx.Response:
        seen[request.url.path] = request.extensions["timeout"]
        return httpx.Response(200, json={"data": [], "tokens": []})

    vllm = client_of(record, timeout=7.0, load_timeout=90.0)
    await vllm.models()
    await vllm.load_adapter("a", "/a")
    await vllm.health(timeout=2.0)
    assert seen["/v1/models"]["read"] == 7.0
    assert seen["/v1/load_lora_adapter"]["read"] == 90.0
    assert seen["/health"]["connect"] == 2.0


async def test_a_shared_http_client_stays_open_and_an_own_one_is_closed():
    shared = httpx.AsyncClient(transport=httpx.MockTransport(FakeVLLM()))
    await VLLMClient("http://vllm", http=shared).aclose()
    assert not shared.is_closed
    own = VLLMClient("http://vllm")
    await own.aclose()
    assert own.http.is_closed
    await shared.aclose()


def test_core_imports_neither_the_proxy_nor_the_learner_nor_torch():
    code = ("import sys, nextstate.core.vllm, nextstate.core.vllm_guard; "
            "print(sorted(m for m in sys.modules if m.startswith(('nextstate.proxy', "
            "'nextstate.learner', 'torch'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
