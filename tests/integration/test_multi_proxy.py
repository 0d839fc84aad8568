"""Two proxy processes, one PostgreSQL store, the real vLLM: nothing lost or duplicated,
and a session whose turns hit different processes is still paired (session state lives
in the store, not in one process's memory)."""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from nextstate.core.store import Store
from nextstate.core.vllm_server import free_port, spawn, stop_group
from tests.conftest import MODEL_NAME

pytestmark = pytest.mark.integration
ASK = {"model": MODEL_NAME, "temperature": 0, "max_tokens": 6}


def start_proxy_process(backend: str, store: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = spawn([sys.executable, "-m", "nextstate.cli", "serve", "--backend",
                     backend, "--port", str(port), "--store", store], log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/health", timeout=1)
            return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    stop_group(process)
    raise RuntimeError(f"proxy did not start: {log.read_text()[-2000:]}")


@pytest.fixture
def two_proxies(vllm, postgres_url, tmp_path):
    started = [start_proxy_process(vllm.url, postgres_url, tmp_path / f"proxy{i}.log")
               for i in range(2)]
    yield [url for _, url in started], postgres_url
    for process, _ in started:
        stop_group(process)


def wait_for_turns(store_url: str, count: int, timeout: float = 20) -> list[dict]:
    store = Store(store_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            turns = list(store.turns.iterate())
            if len(turns) >= count or time.monotonic() > deadline:
                return turns
            time.sleep(0.1)
    finally:
        store.close()


def test_a_conversation_across_two_processes_is_one_paired_session(two_proxies):
    (a, b), store_url = two_proxies
    messages = [{"role": "user", "content": "Hello there"}]
    for i in range(4):
        proxy = (a, b)[i % 2]  # turns alternate between the two processes
        reply = httpx.post(f"{proxy}/v1/chat/completions", json={**ASK, "messages": messages},
                           timeout=60).json()["choices"][0]["message"]
        messages += [{"role": "assistant", "content": reply["content"]},
                     {"role": "user", "content": f"Follow-up number {i}"}]
    turns = sorted(wait_for_turns(store_url, 4), key=lambda t: t["turn_index"])
    assert len({t["session_id"] for t in turns}) == 1
    assert [t["turn_index"] for t in turns] == [0, 1, 2, 3]
    for i, turn in enumerate(turns[:3]):
        assert turn["next_state"] == [{"role": "user", "content": f"Follow-up number {i}"}]
        assert turn["next_turn_id"] == turns[i + 1]["turn_id"]


def test_concurrent_writes_from_two_processes_lose_and_duplicate_nothing(two_proxies):
    (a, b), store_url = two_proxies

    def ask(i: int) -> int:
        proxy = (a, b)[i % 2]
        return httpx.post(f"{proxy}/v1/chat/completions", timeout=60, json={
            **ASK, "messages": [{"role": "user", "content": f"request {i}"}],
            "stream": i % 3 == 0}).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(ask, range(40)))
    assert codes == [200] * 40
    turns = wait_for_turns(store_url, 40)
    contents = sorted(t["request"]["messages"][0]["content"] for t in turns)
    assert contents == sorted(f"request {i}" for i in range(40))
    assert len({t["turn_id"] for t in turns}) == 40
