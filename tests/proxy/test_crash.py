"""A killed proxy loses no answered turn: the real ``nextstate serve`` as a process under
load (whole and streamed requests from concurrent clients), SIGKILLed mid-load (with the
SQLite store free, or held by another connection's exclusive transaction), started again
on the same data dir and store. Every request a client saw answered 200, complete, is
recorded exactly once; nothing is recorded twice."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from nextstate.core.store import Store
from nextstate.core.vllm_server import free_port, spawn, stop_group

CLIENTS = 16  # half whole, half streamed
REPO = Path(__file__).resolve().parents[2]


def start(command: list[str], log: Path, url: str, env: dict[str, str] | None = None):
    process = spawn(command, log, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1).status_code < 500:
                return process
        if process.poll() is not None:
            break
        time.sleep(0.1)
    stop_group(process)
    raise RuntimeError(f"{command[2]} did not start: {log.read_text()[-3000:]}")


def serve(upstream: str, home: Path, store_url: str, port: int):
    """``nextstate serve`` as its own process (the journal lives in ``home``/spool)."""
    return start([sys.executable, "-m", "nextstate.cli", "serve", "--backend", upstream,
                  "--port", str(port), "--store", store_url], home / f"proxy-{port}.log",
                 f"http://127.0.0.1:{port}", {"NEXTSTATE_HOME": str(home)})


@pytest.fixture
def upstream(tmp_path):
    """The benchmark's vLLM-shaped fake, as its own process; streams take ~70 ms."""
    port = free_port()
    process = start([sys.executable, "-m", "bench.fake_upstream", "--port", str(port),
                     "--chunk-delay-ms", "2"], tmp_path / "upstream.log",
                    f"http://127.0.0.1:{port}", {"PYTHONPATH": str(REPO)})
    yield f"http://127.0.0.1:{port}"
    stop_group(process)


class Load:
    """Concurrent clients; what each saw answered 200 in full, by the text it asked."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answered: dict[str, str] = {}  # asked text -> turn id
        self.broken = 0  # requests cut off by the kill
        self.stop = False

    async def client(self, http: httpx.AsyncClient, n: int) -> None:
        stream = n % 2 == 1
        for i in range(1_000_000):
            if self.stop:
                return
            text = f"client {n} request {i}"
            body = {"model": "bench", "max_tokens": 32, "stream": stream,
                    "messages": [{"role": "user", "content": text}]}
            try:
                async with http.stream("POST", f"{self.url}/v1/chat/completions",
                                       json=body) as answer:
                    data = await answer.aread()
            except httpx.HTTPError:
                self.broken += 1
                return  # the proxy is gone
            complete = data.endswith(b"data: [DONE]\n\n") if stream else data.endswith(b"}")
            if answer.status_code == 200 and complete:
                self.answered[text] = answer.headers["x-nextstate-turn-id"]

    async def run_until(self, kill) -> None:
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(timeout=30, limits=limits) as http:
            clients = [asyncio.create_task(self.client(http, n)) for n in range(CLIENTS)]
            await kill()
            await asyncio.wait_for(asyncio.gather(*clients), timeout=60)


@pytest.mark.parametrize("store_locked", [False, True], ids=["store-free", "store-locked"])
async def test_sigkill_mid_load_loses_no_answered_turn_and_duplicates_none(
        upstream, tmp_path, store_locked):
    home = tmp_path / "home"
    db = home / "store.db"
    home.mkdir()
    store_url = f"sqlite:///{db}"
    Store(store_url).turns.count()  # the tables, so that another connection can lock them
    port = free_port()
    proxy = serve(upstream, home, store_url, port)
    load = Load(f"http://127.0.0.1:{port}")
    lock: sqlite3.Connection | None = None
    pending_at_kill = 0

    async def kill() -> None:
        nonlocal lock, pending_at_kill
        await asyncio.sleep(2.0)  # under load
        if store_locked:
            # The store locked for the proxy's writer, taken between two of its
            # transactions (waiting for one to end, off the clients' event loop).
            lock = sqlite3.connect(db, timeout=30, check_same_thread=False)
            await asyncio.to_thread(lock.execute, "BEGIN EXCLUSIVE")
            await asyncio.sleep(1.5)
        async with httpx.AsyncClient() as http:
            health = (await http.get(f"{load.url}/health")).json()["recorder"]
        pending_at_kill = health["spool_pending"]
        os.kill(proxy.pid, signal.SIGKILL)
        load.stop = True

    try:
        await load.run_until(kill)
        assert proxy.wait(10) == -signal.SIGKILL
        assert load.answered and load.broken  # it died mid-load
        if store_locked:
            assert pending_at_kill > 0  # answered turns were waiting for the store
        again = serve(upstream, home, store_url, port)
        try:
            if lock is not None:
                await asyncio.sleep(1.0)  # still locked while the new process starts
                lock.rollback()
                lock.close()
            turns = await _recorded(Store(store_url), f"http://127.0.0.1:{port}")
        finally:
            stop_group(again)
    finally:
        stop_group(proxy)
    asked = Counter(t["request"]["messages"][0]["content"] for t in turns)
    assert [text for text, n in asked.items() if n > 1] == []  # nothing recorded twice
    by_id = {t["turn_id"]: t for t in turns}
    lost = [text for text, turn_id in load.answered.items() if turn_id not in by_id]
    assert lost == [], f"{len(lost)} of {len(load.answered)} answered turns lost"
    for text, turn_id in load.answered.items():
        turn = by_id[turn_id]
        assert turn["request"]["messages"][0]["content"] == text
        assert turn["status"] == "ok" and len(turn["completion_token_ids"]) == 32


async def _recorded(store: Store, url: str, timeout: float = 60) -> list[dict]:
    """The store's turns once the restarted proxy has written its predecessor's journal."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            health = (await http.get(f"{url}/health")).json()["recorder"]
            if not health["starting"] and not health["spool_pending"]:
                break
            await asyncio.sleep(0.2)
    try:
        return list(store.turns.iterate())
    finally:
        store.close()
