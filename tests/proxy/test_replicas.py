"""Several vLLM replicas behind one proxy: affinity, failover, re-admission."""

from __future__ import annotations

import time

import httpx
from starlette.testclient import TestClient

from nextstate.proxy.app import make_app
from nextstate.proxy.settings import ProxySettings
from tests.proxy.fake_vllm import FakeVLLM
from tests.proxy.test_app import CHAT, publish_adapter


class Replicas:
    """Two fake vLLMs told apart by host; either can be taken down."""

    def __init__(self) -> None:
        self.fakes = {"a": FakeVLLM(), "b": FakeVLLM()}
        self.down: set[str] = set()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.host in self.down:
            raise httpx.ConnectError("connection refused", request=request)
        return self.fakes[request.url.host](request)

    def served(self, host: str) -> list[str]:
        return [h.get("x-test-session", "") for h in self.fakes[host].headers]


def open_pool(tmp_path, replicas, **settings):
    app = make_app(ProxySettings(backends=("http://a", "http://b"),
                                 store_url=f"sqlite:///{tmp_path}/s.db",
                                 spool_dir=tmp_path / "spool", health_interval_seconds=0.05,
                                 adapter_poll_seconds=0.02, **settings),
                   transport=httpx.MockTransport(replicas))
    return TestClient(app)


def ask(client, session: str):
    return client.post("/v1/chat/completions", json=CHAT,
                       headers={"X-Session-Id": session, "X-Test-Session": session})


def test_a_session_stays_on_one_replica_and_sessions_spread(tmp_path):
    replicas = Replicas()
    with open_pool(tmp_path, replicas) as c:
        for session in [f"s{i}" for i in range(12)] * 2:
            assert ask(c, session).status_code == 200
    on_a, on_b = set(replicas.served("a")), set(replicas.served("b"))
    assert on_a and on_b and not on_a & on_b  # spread, and never split


def test_a_replica_that_is_down_is_failed_over(tmp_path):
    replicas = Replicas()
    with open_pool(tmp_path, replicas) as c:
        replicas.down.add("b")
        answers = [ask(c, f"s{i}").status_code for i in range(10)]
        health = c.get("/health").json()
    assert answers == [200] * 10
    assert set(replicas.served("a")) == {f"s{i}" for i in range(10)}
    assert [b["ok"] for b in health["backends"]] == [True, False]
    assert health["status"] == "degraded"


def test_a_replica_comes_back_only_with_the_current_adapter(tmp_path):
    replicas = Replicas()
    with open_pool(tmp_path, replicas, policy="toy") as c:
        replicas.down.add("b")
        name = publish_adapter(tmp_path, "toy", 4)
        deadline = time.monotonic() + 5
        pool = c.app_state["deps"].backends
        while not (c.app_state["deps"].router.current and pool.backends[0].adapter == name):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        replicas.down.discard("b")  # b restarts: it has no runtime adapters
        while not pool.backends[1].serving(name):
            assert time.monotonic() < deadline
            time.sleep(0.02)
    loads = [body["lora_name"] for path, body in replicas.fakes["b"].admin
             if path == "/v1/load_lora_adapter"]
    assert loads == [name]  # loaded on b before b was taken back


def test_a_replica_that_times_out_on_connect_is_failed_over(tmp_path, monkeypatch):
    """The first replica in a session's ranking drops SYNs (a real listener that accepts
    nothing), the second is a fake vLLM over real HTTP: the request waits out the connect
    timeout, goes to the second, and is answered and recorded once."""
    from nextstate.proxy.replicas import BackendPool
    from tests.proxy.upstream import RecordingUpstream, black_hole

    async def no_watcher(self, router, interval):  # the relay's own failover, alone
        return None

    monkeypatch.setattr(BackendPool, "watch", no_watcher)
    with black_hole() as hole, RecordingUpstream() as upstream:
        app = make_app(ProxySettings(backends=(hole, upstream.url),
                                     store_url=f"sqlite:///{tmp_path}/s.db",
                                     spool_dir=tmp_path / "spool",
                                     upstream_connect_timeout=0.3))
        with TestClient(app) as c:
            pool = c.app_state["deps"].backends
            session = next(s for s in (f"s{i}" for i in range(100))
                           if pool.ranked(s)[0].url == hole)
            answers = [ask(c, session).status_code,
                       c.post("/v1/chat/completions", json={**CHAT, "stream": True},
                              headers={"X-Session-Id": session}).status_code]
            c.portal.call(c.app_state["deps"].recorder.flush)
            turns = list(c.app_state["deps"].store.turns.iterate())
            down = not pool.backends[0].healthy
    assert answers == [200, 200]
    assert down  # and skipped by the next requests until the watcher sees it again
    assert upstream.paths() == ["/v1/chat/completions"] * 2
    assert [t["status"] for t in turns] == ["ok", "ok"]
