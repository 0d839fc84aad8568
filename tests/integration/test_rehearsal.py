"""A local rehearsal of a team deployment (README: "Scaling"): two vLLM backends, two
proxy processes in front of both, one PostgreSQL store, one learner of two processes
(torchrun, FSDP) publishing to both backends. Traffic goes through both proxies; the
learner trains and publishes; both backends get the adapter and both proxies serve it."""

from __future__ import annotations

import sys
import time

import httpx
import pytest

from nextstate.core.store import Store
from nextstate.core.vllm_server import VLLMProcess, free_port, spawn, stop_group, toy_model_config
from nextstate.experiment.converse import CORRECTIONS
from tests.conftest import MODEL_NAME

pytestmark = pytest.mark.integration
ASK = {"model": MODEL_NAME, "temperature": 1.0, "max_tokens": 10}


def wait_up(url: str, log, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/health", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(log.read_text()[-2000:])


def test_two_backends_two_proxies_postgres_one_learner(vllm, toy_model, postgres_url,
                                                        tmp_path):
    second = VLLMProcess(toy_model_config(toy_model, MODEL_NAME,
                                          log_path=tmp_path / "vllm2.log")).start()
    backends = [vllm.url, second.url]
    processes = []
    try:
        proxies = []
        for i in range(2):
            port = free_port()
            log = tmp_path / f"proxy{i}.log"
            processes.append(spawn([
                sys.executable, "-m", "nextstate.cli", "serve", "--port", str(port),
                "--store", postgres_url, "--policy", MODEL_NAME,
                *[arg for b in backends for arg in ("--backend", b)]], log))
            proxies.append(f"http://127.0.0.1:{port}")
            wait_up(proxies[-1], log)
        # The learner on "a GPU node" with two GPUs: two processes, weights sharded.
        learner_log = tmp_path / "learner.log"
        processes.append(spawn([
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", "2", "-m", "nextstate.cli", "learn", "--shard",
            "--store", postgres_url, "--model", MODEL_NAME, "--model-dir", str(toy_model),
            "--batch-turns", "4", *[arg for b in backends for arg in ("--backend", b)]],
            learner_log))

        # Conversations whose turns alternate between the two proxies.
        for i in range(6):
            messages = [{"role": "user", "content": f"What is {i} times 3?"}]
            for turn in range(2):
                proxy = proxies[(i + turn) % 2]
                reply = httpx.post(f"{proxy}/v1/chat/completions", timeout=60, json={
                    **ASK, "messages": messages}).json()["choices"][0]["message"]["content"]
                messages += [{"role": "assistant", "content": reply},
                             {"role": "user", "content": CORRECTIONS[i % 4]}]

        name = f"{MODEL_NAME}@000001"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            status = httpx.get(f"{proxies[0]}/v1/learner/status").json()
            if status["serving"] == name and httpx.get(
                    f"{proxies[1]}/v1/learner/status").json()["serving"] == name:
                break
            time.sleep(1)
        else:
            said = [line for line in learner_log.read_text().splitlines()
                    if " nextstate" in line or "Error" in line]
            raise AssertionError("no adapter published; the learner said:\n"
                                 + "\n".join(said[-40:]))
        said = learner_log.read_text()
        assert "rank 0 of 2" in said and "rank 1 of 2" in said
        learner = status["learner"]
        assert learner["ranks"] == 2 and learner["sharded"] is True
        for url in backends:
            models = {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
            assert name in models, url
        for proxy in proxies:
            answer = httpx.post(f"{proxy}/v1/chat/completions", timeout=60, json={
                **ASK, "messages": [{"role": "user", "content": "And now?"}]})
            assert answer.status_code == 200 and answer.json()["model"] == MODEL_NAME
        store = Store(postgres_url)
        deadline = time.monotonic() + 30
        while True:  # records are written off the request path: wait for them
            turns = list(store.turns.iterate())
            if sum(t["served_model"] == name for t in turns) >= 2 or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.2)
        store.close()
        assert sum(t["served_model"] == name for t in turns) >= 2
        sessions = {t["session_id"] for t in turns if t["turn_index"] == 1}
        assert len(sessions) == 6  # each conversation paired across the two proxies
    finally:
        for process in processes:
            stop_group(process)
        second.stop()
