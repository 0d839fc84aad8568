"""Bad input, generated: no request to the proxy's own endpoints gives a 5xx or kills it.

schemathesis fuzzes the proxy over real HTTP (uvicorn on a thread) against the OpenAPI
description the project maintains (``/openapi.json``), with valid and invalid data;
hypothesis throws raw bytes, arbitrary JSON and hostile headers at it in-process.
"""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from starlette.testclient import TestClient

from nextstate.core.vllm_server import free_port
from nextstate.proxy.app import make_app
from nextstate.proxy.openapi import openapi_schema
from nextstate.proxy.server import BackgroundProxy
from nextstate.proxy.settings import MemorySettings, ProxySettings
from tests.proxy.fake_vllm import FakeVLLM

SCHEMA = schemathesis.openapi.from_dict(openapi_schema())


@pytest.fixture(scope="module")
def live_proxy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    settings_ = ProxySettings(backends=("http://vllm",), store_url=f"sqlite:///{tmp}/s.db",
                              spool_dir=tmp / "spool", max_body_bytes=64 * 1024,
                              memory=MemorySettings(enabled=True))
    proxy = BackgroundProxy(settings_, free_port(), transport=httpx.MockTransport(FakeVLLM()))
    with proxy:
        yield proxy


@SCHEMA.parametrize()
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.filter_too_much, HealthCheck.too_slow])
def test_no_request_makes_the_proxy_fail(case, live_proxy):
    case.call_and_validate(base_url=live_proxy.url, checks=[not_a_server_error])


def test_the_served_description_is_the_maintained_one(live_proxy):
    assert httpx.get(f"{live_proxy.url}/openapi.json").json() == openapi_schema()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("props")
    app = make_app(ProxySettings(backends=("http://vllm",), store_url=f"sqlite:///{tmp}/s.db",
                                 spool_dir=tmp / "spool"),
                   transport=httpx.MockTransport(FakeVLLM()))
    with TestClient(app) as c:
        yield c


PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/feedback", "/v1/next_state",
         "/v1/messages", "/v1/responses"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=20)
slow = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@slow
@given(path=st.sampled_from(PATHS), body=st.binary(max_size=512))
def test_any_bytes_get_an_answer_below_500(client, path, body):
    answer = client.post(path, content=body, headers={"content-type": "application/json"})
    assert answer.status_code < 500


@slow
@given(path=st.sampled_from(PATHS), body=json_values)
def test_any_json_gets_an_answer_below_500(client, path, body):
    answer = client.post(path, content=json.dumps(body),  # json: any integer size
                         headers={"content-type": "application/json"})
    assert answer.status_code < 500
    if not isinstance(body, dict):
        assert answer.status_code == 400
        assert answer.json()["error"]["type"] == "invalid_request_error"


@slow
@given(name=st.sampled_from(["X-Session-Id", "X-Turn-Type", "X-Session-Done",
                             "X-NextState-Feedback", "X-NextState-Hint",
                             "X-NextState-Feedback-For", "X-NextState-Record"]),
       value=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126),
                     max_size=40))
def test_any_session_or_feedback_header_gets_an_answer_below_500(client, name, value):
    answer = client.post("/v1/chat/completions", headers={name: value}, json={
        "model": "toy", "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code in (200, 400)


DIALECT_FIELDS = {"/v1/messages": ("messages", "system", "tools", "tool_choice", "max_tokens",
                                   "thinking", "output_config", "stop_sequences", "stream"),
                  "/v1/responses": ("input", "instructions", "tools", "tool_choice", "text",
                                    "reasoning", "include", "previous_response_id", "stream")}


@slow
@given(path=st.sampled_from(sorted(DIALECT_FIELDS)), data=st.data())
def test_any_dialect_shaped_json_gets_an_answer_below_500(client, path, data):
    """A dialect request with each field anything at all (items and blocks included)."""
    fields = DIALECT_FIELDS[path]
    body = {"model": "toy", **data.draw(st.dictionaries(st.sampled_from(fields), json_values
                                                         | st.lists(st.dictionaries(
                                                             st.sampled_from(["type", "role",
                                                                              "content", "text",
                                                                              "call_id", "id"]),
                                                             json_values), max_size=3),
                                                         max_size=5))}
    answer = client.post(path, content=json.dumps(body),  # json: infinities too
                         headers={"content-type": "application/json"})
    assert answer.status_code < 500, answer.text


def test_deeply_nested_json_is_a_400(client):
    deep = b"[" * 5000 + b"]" * 5000
    answer = client.post("/v1/chat/completions", content=deep,
                         headers={"content-type": "application/json"})
    assert answer.status_code == 400


def test_a_client_too_slow_to_send_its_body_gets_a_408(tmp_path):
    import socket

    settings_ = ProxySettings(backends=("http://vllm",), store_url=f"sqlite:///{tmp_path}/s.db",
                              spool_dir=tmp_path / "spool", body_timeout_seconds=0.5)
    with BackgroundProxy(settings_, free_port(),
                         transport=httpx.MockTransport(FakeVLLM())) as proxy:
        host, port = proxy.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
            answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408")
        assert b"timeout_error" in answer
        assert httpx.get(f"{proxy.url}/health").status_code == 200  # still serving


def test_nothing_the_fuzzers_sent_was_rejected_by_the_store(client):
    """Every request above was recorded (or refused before recording): none of them
    made the writer fail."""
    deps = client.app_state["deps"]
    client.portal.call(deps.recorder.flush)
    assert deps.recorder.stats.rejected == 0
    assert deps.recorder.stats.store_errors == 0
