"""The inference endpoints forwarded as they are: exactly these, to their own path, with
the backend's key and never the client's, failing over while nothing was sent; the
proxy's own refusals under /v1/messages in Anthropic's error shape."""

from __future__ import annotations

import time

import httpx
import orjson
import pytest
from starlette.testclient import TestClient

from nextstate.proxy.app import make_app
from nextstate.proxy.settings import ProxySettings
from tests.proxy.fake_vllm import FakeVLLM


class Echo:
    """Records each request and answers 201 with what it got (so 'untouched' shows)."""

    def __init__(self) -> None:
        self.seen: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        return httpx.Response(201, headers={"x-upstream": "yes"}, content=b"raw:" + (
            request.content or b""))


def client_for(tmp_path, upstream, **settings) -> TestClient:
    return TestClient(make_app(ProxySettings(
        backends=("http://vllm",), store_url=f"sqlite:///{tmp_path}/s.db",
        spool_dir=tmp_path / "spool", **settings), transport=httpx.MockTransport(upstream)))


FORWARDED = [("POST", "/v1/responses"), ("GET", "/v1/responses/resp_1"),
             ("POST", "/v1/responses/resp_1/cancel"), ("POST", "/v1/messages"),
             ("POST", "/v1/messages/count_tokens"), ("GET", "/v1/models"),
             ("POST", "/v1/embeddings"), ("POST", "/tokenize"), ("POST", "/detokenize")]


def test_each_inference_endpoint_is_forwarded_to_its_own_path_untouched(tmp_path):
    echo = Echo()
    with client_for(tmp_path, echo) as client:
        for method, path in FORWARDED:
            answer = client.request(method, path + "?a=1&b=%2F", content=b'{"x": 1}',
                                    headers={"content-type": "application/json"})
            assert answer.status_code == 201 and answer.headers["x-upstream"] == "yes"
            assert answer.content == b'raw:{"x": 1}'
    assert [(r.method, r.url.raw_path.decode()) for r in echo.seen] == [
        (m, p + "?a=1&b=%2F") for m, p in FORWARDED]


@pytest.mark.parametrize("method,path", [
    ("DELETE", "/v1/responses/resp_1"), ("GET", "/v1/responses"), ("PUT", "/v1/models"),
    ("GET", "/v1/models/toy"), ("POST", "/v1/responses/a/b"), ("GET", "/tokenize"),
    ("POST", "/v1/audio/transcriptions"), ("POST", "/v2/rerank"), ("POST", "/pooling"),
    ("GET", "/server_info"), ("POST", "/v1/chat/completions/render")])
def test_anything_else_is_answered_by_the_proxy_and_never_forwarded(tmp_path, method, path):
    echo = Echo()
    with client_for(tmp_path, echo) as client:
        answer = client.request(method, path, json={})
    assert answer.status_code in (400, 404)
    assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
    assert echo.seen == []


def test_vllms_answers_pass_through_as_they_are(tmp_path):
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"detail": "Not Found"})

    with client_for(tmp_path, refuse) as client:
        answer = client.post("/v1/embeddings", json={"model": "toy", "input": "hi"})
    assert (answer.status_code, answer.json()) == (404, {"detail": "Not Found"})


def test_the_backends_key_replaces_the_clients(tmp_path):
    echo = Echo()
    with client_for(tmp_path, echo, api_key="client", backend_api_key="backend") as client:
        client.get("/v1/models", headers={"Authorization": "Bearer client"})
        client.post("/v1/messages", json={}, headers={"x-api-key": "client"})
    assert [r.headers.get("authorization") for r in echo.seen] == ["Bearer backend"] * 2
    assert all("x-api-key" not in r.headers for r in echo.seen)


def test_a_proxy_with_only_an_admin_key_never_forwards_it(tmp_path):
    echo = Echo()
    with client_for(tmp_path, echo, admin_key="root") as client:
        assert client.get("/v1/models", headers={"Authorization": "Bearer root"}
                          ).status_code == 201
    assert "authorization" not in echo.seen[0].headers


def test_an_open_proxy_passes_the_clients_own_credentials(tmp_path):
    echo = Echo()
    with client_for(tmp_path, echo) as client:
        client.get("/v1/models", headers={"Authorization": "Bearer theirs"})
        client.post("/v1/messages", json={}, headers={"x-api-key": "theirs"})
    assert echo.seen[0].headers["authorization"] == "Bearer theirs"
    assert echo.seen[1].headers["x-api-key"] == "theirs"


def anthropic_error(answer: httpx.Response) -> str:
    body = answer.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    return str(body["error"]["type"])


def test_the_proxys_own_refusals_under_messages_are_in_anthropics_shape(tmp_path):
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with client_for(tmp_path, down, max_body_bytes=10) as client:
        assert anthropic_error(client.post("/v1/messages", content=b"x" * 11)) == \
            "request_too_large"
        answer = client.post("/v1/messages", content=b"{}")
        assert answer.status_code == 502 and anthropic_error(answer) == "api_error"
        answer = client.post("/v1/messages/batches", content=b"{}")
        assert answer.status_code == 404 and anthropic_error(answer) == "not_found_error"
        answer = client.get("/v1/messages")
        assert answer.status_code == 400 and anthropic_error(answer) == "invalid_request_error"
        # and elsewhere, OpenAI's
        assert client.post("/v1/responses", content=b"{}").json()["error"]["type"] == \
            "backend_unavailable"
    with client_for(tmp_path, Echo(), api_key="k") as client:
        answer = client.post("/v1/messages", json={}, headers={"x-api-key": "wrong"})
        assert answer.status_code == 401 and anthropic_error(answer) == "authentication_error"
        assert client.post("/v1/messages", json={}, headers={"x-api-key": "k"}
                           ).status_code == 201


def test_a_forwarded_request_fails_over_while_nothing_was_sent(tmp_path):
    fake = FakeVLLM()
    tried: list[str] = []
    down: set[str] = set()

    def replicas(request: httpx.Request) -> httpx.Response:
        tried.append(request.url.host)
        if request.url.host in down:
            raise httpx.ConnectTimeout("no answer to the SYN", request=request)
        return fake(request)

    app = make_app(ProxySettings(backends=("http://a", "http://b"),
                                 store_url=f"sqlite:///{tmp_path}/s.db",
                                 spool_dir=tmp_path / "spool", health_interval_seconds=3600,
                                 adapter_poll_seconds=3600),
                   transport=httpx.MockTransport(replicas))
    with TestClient(app) as client:
        pool = client.app_state["deps"].backends
        while len(tried) < 2:  # the watcher's first look at both
            time.sleep(0.01)
        first = pool.ranked(None)[0]
        down.add(httpx.URL(first.url).host)  # the one a request tries first goes quiet
        tried.clear()
        answer = client.get("/v1/models")
    assert answer.status_code == 200 and orjson.loads(answer.content)["data"]
    assert tried == [httpx.URL(first.url).host, *(
        httpx.URL(b.url).host for b in pool.backends if b is not first)]
    assert not first.healthy  # and it is skipped until the watcher sees it again
