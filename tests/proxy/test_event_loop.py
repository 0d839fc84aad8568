"""Nothing blocks the proxy's event loop (agent -> proxy -> vLLM; proxy -> store): with
the store locked by another process and the recorder's queue full, the journal, the
writer's retries and the router's polls of the store stay off the loop. asyncio's debug
mode logs every callback that holds the loop longer than ``slow_callback_duration``; none
may.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from nextstate.core.vllm_server import free_port
from nextstate.proxy.app import make_app
from nextstate.proxy.server import quiet_gc
from nextstate.proxy.settings import ProxySettings
from tests.proxy.fake_vllm import FakeVLLM

# Debug mode's own bookkeeping makes a request's callback take up to ~15 ms on this
# shared 2-core machine (measured); a call that waits on the locked store takes its busy
# timeout (0.5 s) at least.
SLOW = 0.05


class DebugProxy:
    """The proxy served by uvicorn on its own thread and loop, as in production (the
    clients' work in another loop, so it does not count), in debug mode once warm."""

    def __init__(self, settings: ProxySettings, transport: httpx.AsyncBaseTransport) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(
            make_app(settings, transport=transport), host="127.0.0.1", port=self.port,
            log_level="warning", lifespan="on", loop="asyncio"))
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.server.serve()

    def debug(self, on: bool) -> None:
        def switch() -> None:
            assert self.loop is not None
            self.loop.slow_callback_duration = SLOW
            self.loop.set_debug(on)

        assert self.loop is not None
        self.loop.call_soon_threadsafe(switch)

    def __enter__(self) -> DebugProxy:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive()
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


async def test_a_down_store_and_a_full_queue_never_block_the_loop(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = ProxySettings(
        backends=("http://vllm:8000",), policy="toy",
        store_url=f"sqlite:///{tmp_path / 'store.db'}", sqlite_busy_timeout=0.5,
        spool_dir=tmp_path / "spool", queue_size=1, journal_sync_seconds=0.01,
        adapter_poll_seconds=0.01)
    # The store is down: another process holds it locked for the whole test.
    holder = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    # As the proxy's own process runs (proxy/server.py's quiet_gc): a test process that
    # has run many tests before has a heap whose full collections alone take ~50 ms.
    thresholds = gc.get_threshold()
    quiet_gc()
    try:
        answers, health, slow = await _measure(settings, caplog)
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
    holder.close()
    assert [a.status_code for a in answers] == [200] * 40
    assert health["recorder"]["spool_pending"] > 1  # they wait in the journal
    assert slow == []


async def _measure(settings: ProxySettings, caplog: pytest.LogCaptureFixture
                   ) -> tuple[list[httpx.Response], dict[str, Any], list[str]]:
    ask = {"model": "toy", "messages": [{"role": "user", "content": "hi"}]}
    with DebugProxy(settings, httpx.MockTransport(FakeVLLM())) as proxy:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxy.port}") as client:
            await client.post("/v1/chat/completions", json=ask)  # warm: first imports
            caplog.set_level(logging.WARNING, logger="asyncio")
            proxy.debug(True)
            await asyncio.sleep(0.05)
            answers = [await client.post("/v1/chat/completions",
                                         json={**ask, "stream": i % 2 == 1})
                       for i in range(40)]
            await asyncio.sleep(0.3)  # the writer retries, the journal syncs, the polls
            health = (await client.get("/health")).json()
            proxy.debug(False)
    slow = [r.getMessage() for r in caplog.records
            if r.name == "asyncio" and "took" in r.getMessage()]
    return answers, health, slow
