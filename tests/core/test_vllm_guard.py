"""nextstate's guard inside vLLM: the key on every path but ``GET /health``, where
vLLM's own key leaves most of them open (the real vLLM: tests/integration)."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from nextstate.core.vllm_guard import RequireKey


async def ok(request):
    return PlainTextResponse("reached")


def guarded(monkeypatch, key: str = "sekrit") -> TestClient:
    monkeypatch.setenv("VLLM_API_KEY", key)
    app = Starlette(routes=[Route("/{path:path}", ok, methods=["GET", "POST", "DELETE"])])
    app.add_middleware(RequireKey)
    return TestClient(app)


@pytest.mark.parametrize("method,path", [
    ("POST", "/adapters"), ("DELETE", "/adapters/x"), ("POST", "/tokenize"),
    ("GET", "/metrics"), ("POST", "/invocations"), ("POST", "/v1/load_lora_adapter"),
    ("POST", "/health"), ("GET", "/healthz"), ("GET", "/")])
def test_every_path_but_health_wants_the_key(monkeypatch, method, path):
    with guarded(monkeypatch) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"},
                        {"Authorization": "Basic sekrit"}, {"X-Api-Key": "sekrit"}):
            answer = client.request(method, path, headers=headers)
            assert answer.status_code == 401 and answer.text != "reached"
            assert answer.json()["error"]["type"] == "authentication_error"
        answer = client.request(method, path, headers={"Authorization": "Bearer sekrit"})
        assert answer.text == "reached"


def test_health_stays_open(monkeypatch):
    with guarded(monkeypatch) as client:
        assert client.get("/health").text == "reached"


def test_without_a_key_to_ask_for_vllm_does_not_start(monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    app = Starlette(routes=[Route("/", ok)])
    app.add_middleware(RequireKey)
    with pytest.raises(RuntimeError, match="VLLM_API_KEY"), TestClient(app) as client:
        client.get("/")
