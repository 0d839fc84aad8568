"""The proxy's ``/metrics``: Prometheus text that prometheus_client's own parser reads, with
counters that move by exactly what a short burst of load sent (real HTTP, uvicorn on a
thread, a vLLM-shaped fake behind it)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nextstate.core.vllm_server import free_port
from nextstate.proxy.server import BackgroundProxy
from nextstate.proxy.settings import ProxySettings
from tests.proxy.fake_vllm import FakeVLLM
from tests.proxy.test_app import ALICE, KEYS, ROOT, open_client, publish_adapter

CHAT = "/v1/chat/completions"


def parse(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def requests(found: dict, route: str, status: int) -> float:
    return found.get(("nextstate_proxy_requests_total",
                      (("route", route), ("status", str(status)))), 0.0)


@pytest.fixture
def live(tmp_path):
    settings = ProxySettings(backends=("http://vllm",), store_url=f"sqlite:///{tmp_path}/s.db",
                             spool_dir=tmp_path / "spool", **KEYS)
    with BackgroundProxy(settings, free_port(),
                         transport=httpx.MockTransport(FakeVLLM())) as proxy:
        yield proxy


def scrape(proxy: BackgroundProxy) -> dict:
    answer = httpx.get(f"{proxy.url}/metrics", headers=ROOT, timeout=10)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith(
        "text/plain; version=")
    return parse(answer.text)


async def burst(proxy: BackgroundProxy, whole: int, streamed: int, refused: int) -> None:
    """Concurrent requests: whole and streamed chats, and some with a wrong key."""
    body = {"model": "toy", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as client:
        async def one(stream: bool, headers: dict) -> int:
            return (await client.post(CHAT, json={**body, "stream": stream},
                                      headers=headers)).status_code

        codes = await asyncio.gather(
            *(one(False, ALICE) for _ in range(whole)),
            *(one(True, ALICE) for _ in range(streamed)),
            *(one(False, {"Authorization": "Bearer wrong"}) for _ in range(refused)))
    assert sorted(codes) == [200] * (whole + streamed) + [401] * refused


async def test_counters_move_by_what_a_burst_of_load_sent(live):
    before = scrape(live)
    await burst(live, whole=20, streamed=12, refused=5)
    httpx.get(f"{live.url}/v1/nope", headers=ALICE)
    httpx.post(f"{live.url}{CHAT}", content=b"{not json", headers=ALICE)
    deadline = asyncio.get_running_loop().time() + 10
    while (found := scrape(live))[("nextstate_recorder_written_total", ())] < 32:
        assert asyncio.get_running_loop().time() < deadline, found
        await asyncio.sleep(0.05)

    def moved(name: str, labels: tuple = ()) -> float:
        return found[(name, labels)] - before.get((name, labels), 0.0)

    assert requests(found, CHAT, 200) - requests(before, CHAT, 200) == 32
    assert requests(found, CHAT, 401) - requests(before, CHAT, 401) == 5  # before routing
    assert requests(found, CHAT, 400) - requests(before, CHAT, 400) == 1
    assert requests(found, "other", 404) - requests(before, "other", 404) == 1
    chat = (("route", CHAT),)
    assert moved("nextstate_proxy_request_duration_seconds_count", chat) == 38
    assert moved("nextstate_proxy_time_to_first_byte_seconds_count", chat) == 38
    assert found[("nextstate_proxy_request_duration_seconds_bucket",
                  (("le", "+Inf"), *chat))] == found[
        ("nextstate_proxy_request_duration_seconds_count", chat)]
    assert moved("nextstate_recorder_submitted_total") == 32
    assert moved("nextstate_recorder_written_total") == 32
    assert found[("nextstate_recorder_spool_pending", ())] == 0
    assert found[("nextstate_recorder_dropped_total", ())] == 0
    assert found[("nextstate_proxy_requests_in_progress", ())] == 1  # this scrape
    assert found[("nextstate_backend_up", (("backend", "http://vllm"),))] == 1


def test_metrics_need_the_admin_key_when_the_proxy_has_keys(tmp_path):
    with open_client(tmp_path, FakeVLLM(), **KEYS) as client:
        assert client.get("/metrics").status_code == 401
        refused = client.get("/metrics", headers=ALICE)
        assert refused.status_code == 403 and refused.json()["error"]["type"]
        assert client.get("/metrics", headers=ROOT).status_code == 200


def test_a_backend_that_is_down_shows_as_down_and_its_502s_are_counted(tmp_path):
    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with open_client(tmp_path, unreachable) as client:
        body = {"model": "toy", "messages": [{"role": "user", "content": "hi"}]}
        assert client.post(CHAT, json=body).status_code == 502
        found = parse(client.get("/metrics").text)
    assert found[("nextstate_backend_up", (("backend", "http://vllm"),))] == 0
    assert requests(found, CHAT, 502) == 1


def test_the_version_serving_the_policy_is_shown(tmp_path):
    with open_client(tmp_path, FakeVLLM(), policy="toy", adapter_poll_seconds=0.02) as client:
        name = publish_adapter(tmp_path, "toy", 3)
        for _ in range(200):
            found = parse(client.get("/metrics").text)
            if (("nextstate_proxy_serving_info", (("adapter", name), ("policy", "toy"))))\
                    in found:
                break
            time.sleep(0.02)
        assert found[("nextstate_proxy_serving_info", (("adapter", name), ("policy", "toy")))] == 1
