"""The memory's controls on the proxy: /v1/memory, each tenant its own lessons."""

import pytest

from tests.proxy.fake_vllm import FakeVLLM
from tests.proxy.test_app import open_client
from tests.proxy.test_memory import ON

KEYS = {"client_keys": (("team-a", "ka"), ("team-b", "kb")), "admin_key": "root"}


def auth(key):
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def client(tmp_path):
    with open_client(tmp_path, FakeVLLM(), memory=ON, **KEYS) as c:
        yield c


def test_a_tenant_adds_lists_edits_and_forgets_its_own_lessons(client):
    added = client.post("/v1/memory", json={"text": "Answer in French.", "user": "alice"},
                        headers=auth("ka"))
    assert added.status_code == 200, added.text
    lesson = added.json()
    assert (lesson["tenant"], lesson["user"], lesson["pinned"]) == (
        "team-a", "team-a:alice", True)
    assert client.get("/health").json()["memory"]["lessons"] == 1  # served at once
    listed = client.get("/v1/memory", headers=auth("ka")).json()["data"]
    assert [r["id"] for r in listed] == [lesson["id"]]
    assert client.get("/v1/memory?user=alice", headers=auth("ka")).json()["data"] == listed
    edited = client.patch(f"/v1/memory/{lesson['id']}", headers=auth("ka"),
                          json={"text": "Answer in German.", "pinned": False})
    assert edited.json()["text"] == "Answer in German." and not edited.json()["pinned"]
    retired = client.patch(f"/v1/memory/{lesson['id']}", headers=auth("ka"),
                           json={"status": "retired"})
    assert retired.json()["status"] == "retired"
    assert client.get("/health").json()["memory"]["lessons"] == 0
    assert client.delete(f"/v1/memory/{lesson['id']}", headers=auth("ka")).status_code == 200
    assert client.get("/v1/memory", headers=auth("ka")).json()["data"] == []


def test_another_tenants_lessons_are_invisible_and_untouchable(client):
    lesson = client.post("/v1/memory", json={"text": "Answer in French."},
                         headers=auth("ka")).json()
    assert lesson["user"] is None  # the tenant's own: for all its users
    assert client.get("/v1/memory", headers=auth("kb")).json()["data"] == []
    for method in ("patch", "delete"):
        answer = client.request(method.upper(), f"/v1/memory/{lesson['id']}",
                                headers=auth("kb"), json={"pinned": False})
        assert answer.status_code == 404
        assert answer.json()["error"]["type"] == "not_found_error"
    assert client.post("/v1/memory", json={"text": "x", "tenant": "team-a"},
                       headers=auth("kb")).status_code == 403
    assert client.get("/v1/memory?tenant=team-a", headers=auth("kb")).status_code == 403
    everything = client.get("/v1/memory", headers=auth("root")).json()["data"]
    assert [r["id"] for r in everything] == [lesson["id"]]


def test_the_admin_writes_shared_lessons_and_sees_every_tenants(client):
    shared = client.post("/v1/memory", json={"text": "Be kind."}, headers=auth("root"))
    assert (shared.json()["tenant"], shared.json()["user"]) == (None, None)
    client.post("/v1/memory", json={"text": "Be brief."}, headers=auth("kb"))
    assert len(client.get("/v1/memory", headers=auth("root")).json()["data"]) == 2
    only_b = client.get("/v1/memory?tenant=team-b", headers=auth("root")).json()["data"]
    assert [r["text"] for r in only_b] == ["Be brief."]


@pytest.mark.parametrize("body", [{}, {"text": ""}, {"text": 3}, {"text": "x", "pinned": "y"},
                                  {"text": "x" * 2001}])
def test_a_malformed_lesson_is_a_400_in_openais_shape(client, body):
    answer = client.post("/v1/memory", json=body, headers=auth("ka"))
    assert answer.status_code == 400
    assert answer.json()["error"]["type"] == "invalid_request_error"


def test_a_bad_status_is_a_400(client):
    lesson = client.post("/v1/memory", json={"text": "x"}, headers=auth("ka")).json()
    answer = client.patch(f"/v1/memory/{lesson['id']}", json={"status": "gone"},
                          headers=auth("ka"))
    assert answer.status_code == 400
    assert client.get("/v1/memory?status=gone", headers=auth("ka")).status_code == 400
