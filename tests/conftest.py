"""Shared fixtures: the real vLLM (once per test session) and proxies served by uvicorn.

Integration tests use the real stack: the toy model built locally (cached in the data
dir), served by a real vLLM child process, behind a real proxy on a loopback port.
Outside CI they are skipped, with the reason, when vLLM is not installed; in CI
(``NEXTSTATE_REQUIRE_INTEGRATION=1``) a missing vLLM fails the run instead.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from nextstate.proxy.backend import VLLMProcess, free_port, toy_model_config
from nextstate.proxy.server import BackgroundProxy
from nextstate.proxy.settings import ProxySettings, data_dir
from nextstate.proxy.store import Store

MODEL_NAME = "nextstate-toy"


def _require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("NEXTSTATE_REQUIRE_INTEGRATION"):
            pytest.fail("vLLM is not installed but integration tests are required here")
        pytest.skip("vLLM is not installed (pip install 'nextstate[cpu]'); run `make test`")


@pytest.fixture(scope="session")
def toy_model() -> Path:
    from nextstate.learner.toy_model import ensure_toy_model

    return ensure_toy_model(data_dir())


@pytest.fixture(scope="session")
def vllm(toy_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMProcess]:
    """One real vLLM server for the whole test session."""
    _require_vllm()
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    config = toy_model_config(toy_model, MODEL_NAME, log_path=log)
    with VLLMProcess(config) as server:
        yield server


class ProxyServer(BackgroundProxy):
    """A proxy for a test, with a way to wait for its records."""

    def store(self) -> Store:
        return Store(self.settings.resolved_store_url())

    def turns(self, count: int, timeout: float = 15.0, **filters: Any) -> list[dict[str, Any]]:
        """Wait until the store holds ``count`` turns (records are written asynchronously)."""
        store = self.store()
        try:
            deadline = time.monotonic() + timeout
            while True:
                rows = [t for t in store.turns()
                        if all(t.get(k) == v for k, v in filters.items())]
                if len(rows) >= count or time.monotonic() > deadline:
                    return rows
                time.sleep(0.05)
        finally:
            store.close()


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[..., ProxyServer]]:
    """Start proxies with a fresh SQLite store under tmp_path; stopped after the test."""
    started: list[ProxyServer] = []

    def start(backend_url: str, **overrides: Any) -> ProxyServer:
        settings = ProxySettings(backend_url=backend_url,
                                 store_url=f"sqlite:///{tmp_path / 'store.db'}",
                                 spool_dir=tmp_path / "spool")
        proxy = ProxyServer(replace(settings, **overrides), free_port()).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def proxy(vllm: VLLMProcess, start_proxy: Callable[..., ProxyServer]) -> ProxyServer:
    return start_proxy(vllm.url)
