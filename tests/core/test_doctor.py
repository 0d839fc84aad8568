"""Doctor's live checks against a fake vLLM (httpx.MockTransport) answering as vLLM 0.32
does with each flag set or missing (the answers were taken from the real server: see
core/doctor.py's docstring, and tests/integration/test_doctor.py for the real thing)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from nextstate.core.doctor import check_backend, check_proxy
from nextstate.core.health import Finding

URL = "http://vllm.test"
TOKENS = {1: "One", 2: ",", 3: " two"}


@dataclass
class FakeVLLM:
    """A vLLM with the flags of a healthy `nextstate up`, each of which a test can undo."""

    runtime_lora: bool = True
    enable_lora: bool = True
    max_lora_rank: int = 16
    processed_logprobs: bool = True
    token_ids: bool = True
    key: str | None = None
    served: list[str] = field(default_factory=lambda: ["toy"])
    wrong_text: bool = False
    sampling_defaults: bool = False  # a generation config's top_p, say

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.key and request.headers.get("authorization") != f"Bearer {self.key}":
            return httpx.Response(401, json={"error": "Unauthorized"})
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": m} for m in self.served]})
        if path == "/metrics":
            lora = ('vllm:lora_requests_info{max_lora="4",running_lora_adapters=""} 1.0\n'
                    if self.enable_lora else "")
            return httpx.Response(200, text="# HELP vllm:cache_config_info\n" + lora)
        if path == "/v1/load_lora_adapter":
            if not self.runtime_lora:
                return httpx.Response(404, json={"detail": "Not Found"})
            probe = Path(json.loads(request.content)["lora_path"])
            config = json.loads((probe / "adapter_config.json").read_text())
            why = (f"LoRA rank {config['r']} is greater than max_lora_rank "
                   f"{self.max_lora_rank}." if config["r"] > self.max_lora_rank
                   else "<path> doesn't contain tensors")
            return httpx.Response(500, json={"error": {"message": f"Worker failed with "
                                                       f"error '{why}'"}})
        if path == "/v1/chat/completions":
            return self.chat(json.loads(request.content))
        if path == "/v1/completions":  # scoring a prefill: the model's own logprobs
            prompt = json.loads(request.content)["prompt"]
            return httpx.Response(200, json={"choices": [{"prompt_logprobs": [None] + [
                {str(t): {"logprob": -0.1}} for t in prompt[1:]]}]})
        if path == "/detokenize":
            ids = json.loads(request.content)["tokens"]
            return httpx.Response(200, json={"prompt": "".join(TOKENS[i] for i in ids)
                                             + (" three" if self.wrong_text else "")})
        return httpx.Response(404, json={"detail": "Not Found"})

    def chat(self, body: dict) -> httpx.Response:
        t = body.get("temperature", 1.0) if self.processed_logprobs else 1.0
        top = [{"token": "One", "logprob": -0.5 / max(t, 0.01)},
               {"token": "Hi", "logprob": -1.5 / max(t, 0.01)}]
        if body["max_tokens"] == 1:
            content = [{"token": "One", "logprob": top[0]["logprob"], "top_logprobs": top}]
            return httpx.Response(200, json={"choices": [{"message": {"content": "One"},
                                                          "logprobs": {"content": content}}]})
        sampled = -0.05 if self.sampling_defaults and t == 1.0 else -0.1
        choice = {"message": {"content": "One, two"},
                  "logprobs": {"content": [{"token": TOKENS[i], "logprob": sampled}
                                           for i in TOKENS]}}
        answer = {"choices": [choice], "usage": {"completion_tokens": 3}}
        if self.token_ids:
            choice["token_ids"] = list(TOKENS)
            answer["prompt_token_ids"] = [7, 8, 9]
        return httpx.Response(200, json=answer)


async def check(vllm: FakeVLLM, *, api_key: str | None = None, rank: int = 16,
                current: tuple[str, ...] = ()) -> dict[str, Finding]:
    found = await check_backend(URL, api_key=api_key, model=None, lora_rank=rank,
                                current=current, transport=httpx.MockTransport(vllm))
    return {f.check: f for f in found}


def blocks(found: dict[str, Finding]) -> set[str]:
    return {name for name, f in found.items() if f.level == "block"}


async def test_a_healthy_vllm_passes_every_check() -> None:
    found = await check(FakeVLLM())
    assert blocks(found) == set()
    assert {"vllm.reachable", "vllm.lora", "vllm.logprobs_mode", "vllm.token_ids"} <= set(found)
    assert all(f.level == "ok" for f in found.values())


async def test_sampling_defaults_that_make_recomputing_inexact_are_named() -> None:
    assert (await check(FakeVLLM()))["vllm.sampling_defaults"].level == "ok"
    found = await check(FakeVLLM(sampling_defaults=True))
    assert found["vllm.sampling_defaults"].level == "warn"
    assert "--sampler-logprobs record" in found["vllm.sampling_defaults"].fix


async def test_no_runtime_lora_updating_is_named_with_the_environment_variable() -> None:
    found = await check(FakeVLLM(runtime_lora=False))
    assert blocks(found) == {"vllm.runtime_lora"}
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1" in found["vllm.runtime_lora"].fix


async def test_a_vllm_without_enable_lora_is_named() -> None:
    found = await check(FakeVLLM(enable_lora=False))
    assert blocks(found) == {"vllm.enable_lora"}
    assert "--enable-lora --max-lora-rank 16" in found["vllm.enable_lora"].fix


async def test_a_max_rank_under_the_learners_is_named_with_the_rank_to_give() -> None:
    found = await check(FakeVLLM(max_lora_rank=8), rank=32)
    assert blocks(found) == {"vllm.lora_rank"}
    assert "--max-lora-rank 32" in found["vllm.lora_rank"].fix
    assert blocks(await check(FakeVLLM(max_lora_rank=32), rank=32)) == set()


async def test_raw_logprobs_are_named_with_the_logprobs_mode_to_give() -> None:
    found = await check(FakeVLLM(processed_logprobs=False))
    assert blocks(found) == {"vllm.logprobs_mode"}
    assert "--logprobs-mode processed_logprobs" in found["vllm.logprobs_mode"].fix


async def test_missing_or_wrong_token_ids_are_named() -> None:
    assert blocks(await check(FakeVLLM(token_ids=False))) == {"vllm.token_ids"}
    wrong = await check(FakeVLLM(wrong_text=True))
    assert blocks(wrong) == {"vllm.token_ids"}
    assert "decode to other text" in wrong["vllm.token_ids"].what


async def test_a_key_vllm_wants_is_named_and_the_right_key_passes() -> None:
    found = await check(FakeVLLM(key="sekrit"))
    assert blocks(found) == {"vllm.key"}
    assert "--backend-api-key" in found["vllm.key"].fix
    assert blocks(await check(FakeVLLM(key="sekrit"), api_key="sekrit")) == set()


async def test_a_replica_missing_the_current_adapter_is_named() -> None:
    found = await check(FakeVLLM(served=["toy", "toy@000002"]),
                        current=("toy@000003",))
    assert blocks(found) == {"vllm.adapter"}
    assert "toy@000003" in found["vllm.adapter"].what
    assert "rollback" in found["vllm.adapter"].fix
    assert blocks(await check(FakeVLLM(served=["toy", "toy@000003"]),
                              current=("toy@000003",))) == set()


async def test_nothing_answering_is_one_finding_not_a_traceback() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    found = await check_backend(URL, api_key=None, model=None, lora_rank=16,
                                transport=httpx.MockTransport(down))
    assert [(f.check, f.level) for f in found] == [("vllm.reachable", "block")]


@pytest.mark.parametrize(("recorder", "expected"), [
    ({"spool_pending": 0, "rejected": 0}, set()),
    ({"spool_pending": 12, "rejected": 0, "last_error": "locked"}, {"proxy.spool"}),
    ({"spool_pending": 0, "rejected": 2}, {"proxy.rejected"}),
])
async def test_the_proxys_recorder_backlog_is_named(recorder: dict, expected: set) -> None:
    def proxy(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"status": "ok", "backends": [{"url": URL}],
                                         "recorder": recorder})

    found, health = await check_proxy("http://proxy.test", transport=httpx.MockTransport(proxy))
    assert {f.check for f in found if f.level == "warn"} == expected
    assert health["backends"] == [{"url": URL}]


async def test_a_proxy_recording_nothing_blocks() -> None:
    def proxy(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"status": "ok", "backends": [], "recorder": None})

    found, _ = await check_proxy("http://proxy.test", transport=httpx.MockTransport(proxy))
    assert {f.check for f in found if f.level == "block"} == {"proxy.recording"}


async def test_a_check_that_times_out_is_a_finding_not_a_traceback() -> None:
    vllm = FakeVLLM()

    def slow(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/chat/completions":
            raise httpx.ReadTimeout("slow", request=request)
        return vllm(request)

    found = await check_backend(URL, api_key=None, model=None, lora_rank=16,
                                transport=httpx.MockTransport(slow))
    answers = [f for f in found if f.check == "vllm.answers"]
    assert len(answers) == 3 and all("ReadTimeout" in f.what for f in answers)
    assert {f.check: f.level for f in found}["vllm.lora"] == "ok"
