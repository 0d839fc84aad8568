"""Shared fixtures: the real vLLM (once per test session) and proxies served by uvicorn.

Integration tests use the real stack: the toy model built locally (cached in the data
dir), served by a real vLLM child process, behind a real proxy on a loopback port.
Outside CI they are skipped, with the reason, when vLLM is not installed; in CI
(``NEXTSTATE_REQUIRE_INTEGRATION=1``) a missing vLLM fails the run instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from nextstate.core.paths import data_dir
from nextstate.core.store import Store
from nextstate.core.vllm_server import VLLMConfig, VLLMProcess, free_port, toy_model_config
from nextstate.proxy.server import BackgroundProxy
from nextstate.proxy.settings import ProxySettings

MODEL_NAME = "nextstate-toy"
VLM_MODEL_NAME = "nextstate-vlm-toy"
# Retrieval's budget for the tests that expect lessons served. The proxy's is 2 ms of CPU
# (tests/proxy/test_memory.py tests it), and a garbage collection that runs inside one
# search costs more in a test process (torch loaded: ~185 ms for a full one); that request
# then goes without its lessons, by design, counted as slow. test_handover lost a turn's
# lesson so in 3 of 54 runs on a loaded machine.
RETRIEVAL_ROOM_MS = 1000.0


LEARNING_TEST = "tests/integration/test_learning.py"
_BUILD = pytest.StashKey[subprocess.Popen]()  # type: ignore[type-arg]


_STOP_VLM = pytest.StashKey[Callable[[], None]]()


def _uses_vlm(item: pytest.Item) -> bool:
    return "vlm" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The learning test runs last, so that building its model (below) overlaps the rest;
    the tests on the vision toy's vLLM run first, together, so that it can stop after
    them (`pytest_runtest_teardown`) instead of holding ~3 GiB for the whole session."""
    items.sort(key=lambda item: (item.nodeid.startswith(LEARNING_TEST), not _uses_vlm(item)))


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop the vision toy's vLLM after the last test that uses it."""
    if _uses_vlm(item) and (nextitem is None or not _uses_vlm(nextitem)):
        stop = item.config.stash.get(_STOP_VLM, None)
        if stop is not None:
            del item.config.stash[_STOP_VLM]
            stop()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start building the hint-following model in the background when the learning test
    will need it (~10 minutes, one thread): its fixture then waits on the build's lock
    instead of building from scratch."""
    from nextstate.experiment.pretrain import TRAINED_TOY

    wanted = any(item.nodeid.startswith(LEARNING_TEST) for item in session.items)
    if not wanted or (data_dir() / "models" / f"toy-{TRAINED_TOY.digest()}").is_dir():
        return
    data_dir().mkdir(parents=True, exist_ok=True)
    log = open(data_dir() / "trained-toy-build.log", "ab")  # noqa: SIM115 (outlives this hook)
    session.config.stash[_BUILD] = subprocess.Popen(
        [sys.executable, "-c", "from nextstate.experiment.bench import "
         "trained_toy_model; trained_toy_model(print)"], stdout=log, stderr=log)


def pytest_sessionfinish(session: pytest.Session) -> None:
    build = session.config.stash.get(_BUILD, None)
    if build is not None and build.poll() is None:
        build.terminate()  # a later run cleans up the partial build


def _require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("NEXTSTATE_REQUIRE_INTEGRATION"):
            pytest.fail("vLLM is not installed but integration tests are required here")
        pytest.skip("vLLM is not installed (pip install 'nextstate[cpu]'); run `make test`")


def running_requests(vllm_url: str) -> float:
    """How many requests a vLLM is generating now (its Prometheus gauge)."""
    import httpx

    metrics = httpx.get(f"{vllm_url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("vllm:num_requests_running"))


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


class PostgresCluster:
    """A throwaway PostgreSQL cluster on a loopback port, run as the postgres user."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        # Not under pytest's tmp dir: the postgres user cannot enter root's.
        self.root = Path(tempfile.mkdtemp(prefix="nextstate-pg-"))
        shutil.chown(self.root, "postgres")
        self.port = free_port()
        self.url = f"postgresql+psycopg://nextstate@127.0.0.1:{self.port}"
        self._run("initdb", "-D", str(self.root / "data"), "-A", "trust", "-U", "nextstate")

    def _run(self, tool: str, *args: str) -> None:
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*as_postgres, str(self.bin_dir / tool), *args], check=True,
                       capture_output=True)

    def start(self) -> PostgresCluster:
        self._run("pg_ctl", "-D", str(self.root / "data"), "-w", "-l", str(self.root / "log"),
                  "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                        "-c fsync=off", "start")
        return self

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self) -> str:
        import psycopg

        name = f"t{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"postgresql://nextstate@127.0.0.1:{self.port}/postgres",
                             autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"{self.url}/{name}"


def new_postgres() -> PostgresCluster:
    bin_dir = _postgres_bin()
    if bin_dir is None:
        if os.environ.get("NEXTSTATE_REQUIRE_INTEGRATION"):
            pytest.fail("PostgreSQL is not installed but its tests are required here")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    return PostgresCluster(bin_dir).start()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresCluster | str]:
    """A throwaway PostgreSQL server for the session (or NEXTSTATE_TEST_POSTGRES_URL)."""
    given = os.environ.get("NEXTSTATE_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    cluster = new_postgres()
    try:
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def postgres_url(postgres_server: PostgresCluster | str) -> str:
    """A fresh, empty database on the session's PostgreSQL server."""
    if isinstance(postgres_server, PostgresCluster):
        return postgres_server.create_database()
    import psycopg

    name = f"t{uuid.uuid4().hex[:12]}"
    plain = postgres_server.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(f"{plain}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{postgres_server}/{name}"


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each store test runs on SQLite and on a real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(scope="session")
def toy_model() -> Path:
    from nextstate.learner.toy_model import ensure_toy_model

    return ensure_toy_model(data_dir())


@pytest.fixture(autouse=True)
def _unload_test_adapters(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests share one vLLM: what one test loaded must not leak into the next."""
    yield
    if "vllm" not in request.fixturenames:
        return
    import httpx

    server: VLLMProcess = request.getfixturevalue("vllm")
    with contextlib.suppress(httpx.HTTPError):
        for model in httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]:
            if "@" in model["id"]:
                httpx.post(f"{server.url}/v1/unload_lora_adapter",
                           json={"lora_name": model["id"]}, timeout=30)


@pytest.fixture(scope="session")
def vllm(toy_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMProcess]:
    """One real vLLM server for the whole test session."""
    _require_vllm()
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    config = toy_model_config(toy_model, MODEL_NAME, log_path=log)
    with VLLMProcess(config) as server:
        yield server


@pytest.fixture(scope="session")
def vlm_dir() -> Path:
    from nextstate.learner.vlm_toy_model import ensure_vlm_toy_model

    return ensure_vlm_toy_model(data_dir())


@pytest.fixture(scope="session")
def vlm(vlm_dir: Path, request: pytest.FixtureRequest,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMProcess]:
    """One real vLLM serving the vision-language toy, shared by the tests that use it (the
    serving tests and the GUI example) and stopped after the last of them;
    ``--enable-scale-out`` opens the routes the image teacher needs."""
    _require_vllm()
    log = tmp_path_factory.mktemp("vllm-vlm") / "vllm.log"
    config = VLLMConfig(model=vlm_dir, served_model_name=VLM_MODEL_NAME, dtype="float32",
                        extra_args=("--enable-scale-out",), log_path=log)
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(VLLMProcess(config))
        request.config.stash[_STOP_VLM] = stack.close
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
                rows = [t for t in store.turns.iterate()
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
        settings = ProxySettings(backends=(backend_url,),
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
