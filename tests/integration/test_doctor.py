"""`nextstate doctor` on the real stack: a healthy one (vLLM as `nextstate up` starts it, a
proxy, a learner, some traffic) passes with exit code 0; a vLLM started without runtime
LoRA updating and with raw logprobs is named, with both fixes, and exit code 1."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from nextstate.cli import main
from nextstate.core.store import Store
from nextstate.core.vllm_server import VLLMProcess, spawn, stop_group, toy_model_config
from tests.conftest import MODEL_NAME, ProxyServer

pytestmark = pytest.mark.integration


def doctor(*args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(main, ["doctor", "--json", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        result.exception, result.output)
    return result.exit_code, json.loads(result.output)


def wait_for_report(store_url: str, log: Path, timeout: float = 120.0) -> dict:
    store = Store(store_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            report = store.status.read()
            if report is not None and report.get("health"):
                return report
            time.sleep(0.5)
    finally:
        store.close()
    raise AssertionError(f"the learner never reported: {log.read_text()[-2000:]}")


def test_doctor_passes_on_a_healthy_stack(vllm: VLLMProcess, proxy: ProxyServer,
                                         toy_model: Path, tmp_path: Path) -> None:
    store_url = proxy.settings.resolved_store_url()
    for i in range(3):  # conversations of two turns each: sessions pair with no header
        messages = [{"role": "user", "content": f"What is {i} plus 2?"}]
        for _ in range(2):
            reply = httpx.post(f"{proxy.url}/v1/chat/completions", timeout=60, json={
                "model": MODEL_NAME, "messages": messages, "max_tokens": 12}).json()
            messages += [reply["choices"][0]["message"],
                         {"role": "user", "content": "Thanks, that's right."}]
    proxy.turns(6)
    log = tmp_path / "learner.log"
    learner = spawn([sys.executable, "-m", "nextstate.cli", "learn", "--backend", vllm.url,
                     "--store", store_url, "--model", MODEL_NAME, "--model-dir",
                     str(toy_model), "--batch-turns", "16"], log)
    try:
        report = wait_for_report(store_url, log)
        code, found = doctor("--proxy", proxy.url, "--store", store_url)
    finally:
        stop_group(learner)
    blocks = [f for f in found["findings"] if f["level"] == "block"]
    assert code == 0, blocks
    assert found["health"]["state"] == "learning", found["health"]
    checks = {f["check"]: f["level"] for f in found["findings"]}
    for check in ("proxy.reachable", "vllm.reachable", "vllm.lora", "vllm.logprobs_mode",
                  "vllm.token_ids", "store"):
        assert checks.get(check) == "ok", (check, found["findings"])
    # The learner's own status carries the same verdict (the status endpoint shows it).
    assert report["health"]["state"] == "learning"
    status = httpx.get(f"{proxy.url}/v1/learner/status").json()
    assert status["learner"]["health"]["state"] in {"learning", "stalled", "blocked"}


def test_doctor_names_a_vllm_without_runtime_lora_and_with_raw_logprobs(
        toy_model: Path, tmp_path: Path) -> None:
    config = toy_model_config(toy_model, MODEL_NAME, log_path=tmp_path / "vllm.log",
                              env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "0"},
                              extra_args=("--logprobs-mode", "raw_logprobs"))
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    Store(store_url).db.ensure_schema()
    with VLLMProcess(config) as broken:
        code, found = doctor("--proxy", "", "--backend", broken.url, "--store", store_url)
    assert code == 1
    by_check = {f["check"]: f for f in found["findings"]}
    assert by_check["vllm.runtime_lora"]["level"] == "block"
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1" in by_check["vllm.runtime_lora"]["fix"]
    assert by_check["vllm.logprobs_mode"]["level"] == "block"
    assert "--logprobs-mode processed_logprobs" in by_check["vllm.logprobs_mode"]["fix"]
    assert by_check["learner.running"]["level"] == "block"  # no learner on this store
    assert found["health"]["state"] == "blocked"
