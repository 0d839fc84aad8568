"""Routing the policy's name: the shared adapter, each user's personal adapter, the base."""

from __future__ import annotations

import asyncio
import time

import httpx
import orjson
import pytest

from nextstate.core.lora import personal_policy
from nextstate.core.routing import Router
from tests.proxy.fake_vllm import FakeVLLM
from tests.proxy.test_app import CHAT, open_client, publish_adapter, records


def test_a_personal_policy_is_named_after_its_user_or_a_hash_of_odd_ids():
    assert personal_policy("toy", "alice") == "toy~alice"
    assert personal_policy("toy", "team-a:bob.smith") == "toy~team-a:bob.smith"
    odd = personal_policy("toy", "../../etc passwd")
    assert odd.startswith("toy~u-") and "/" not in odd and " " not in odd
    assert odd == personal_policy("toy", "../../etc passwd")  # stable
    assert personal_policy("toy", "x" * 65).startswith("toy~u-")


def test_users_with_their_own_adapter_get_it_and_everyone_else_the_shared_one():
    router = Router("toy")
    router.update({"toy": ("toy@000001", "/a/1"), "toy~alice": ("toy~alice@000002", "/a/2")})
    assert router.route("toy", "alice") == "toy~alice@000002"
    assert router.route("toy", "bob") == "toy@000001"
    assert router.route("toy") == "toy@000001"
    assert router.route("toy@base", "alice") == "toy"
    assert router.route("other", "alice") is None
    assert router.paths == {"toy@000001": "/a/1", "toy~alice@000002": "/a/2"}


def test_a_personal_adapter_serves_before_any_shared_one_exists():
    router = Router("toy", base_model="base")
    router.update({"toy~alice": ("toy~alice@000004", "/a/4")})
    assert router.current is None
    assert router.route("toy", "alice") == "toy~alice@000004"
    assert router.route("toy", "bob") == "base"


def wait_for_personal(client, count: int) -> None:
    router = client.app_state["deps"].router
    deadline = time.monotonic() + 5
    while len(router.personal) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(router.personal) == count


def ask(client, user: str | None = None, **headers: str):
    if user is not None:
        headers["X-NextState-User"] = user
    return client.post("/v1/chat/completions", json={**CHAT, "model": "toy"}, headers=headers)


def test_each_user_is_served_their_own_adapter_side_by_side(tmp_path):
    fake = FakeVLLM()
    with open_client(tmp_path, fake, policy="toy", adapter_poll_seconds=0.02) as c:
        shared = publish_adapter(tmp_path, "toy", 1)
        alice = publish_adapter(tmp_path, personal_policy("toy", "alice"), 2)
        bob = publish_adapter(tmp_path, personal_policy("toy", "bob"), 3)
        wait_for_personal(c, 2)
        answers = [ask(c, user) for user in ("alice", "bob", "carol", None)]
        status = c.get("/v1/learner/status").json()
        rows = records(c, submitted=4)
    assert [r["model"] for r in fake.requests] == [alice, bob, shared, shared]
    assert {a.json()["model"] for a in answers} == {"toy"}  # the name the client asked
    assert [r["user"] for r in rows] == ["alice", "bob", "carol", None]
    assert [r["served_model"] for r in rows] == [alice, bob, shared, shared]
    assert "x-nextstate-user" not in fake.headers[0]  # ours: never forwarded
    assert status["serving"] == shared
    assert status["serving_personal"] == {"toy~alice": alice, "toy~bob": bob}
    loads = [body["lora_name"] for path, body in fake.admin if path == "/v1/load_lora_adapter"]
    assert sorted(loads) == sorted([shared, alice, bob])  # each loaded before its traffic


def test_a_newer_personal_version_takes_over(tmp_path):
    fake = FakeVLLM()
    with open_client(tmp_path, fake, policy="toy", adapter_poll_seconds=0.02) as c:
        publish_adapter(tmp_path, "toy~alice", 1)
        wait_for_personal(c, 1)
        ask(c, "alice")
        newer = publish_adapter(tmp_path, "toy~alice", 2)
        router = c.app_state["deps"].router
        deadline = time.monotonic() + 5
        while router.personal.get("toy~alice") != newer and time.monotonic() < deadline:
            time.sleep(0.01)
        ask(c, "alice")
    assert [r["model"] for r in fake.requests] == ["toy~alice@000001", newer]


class ForgetfulVLLM(FakeVLLM):
    """Answers 404 for an adapter it does not have, as vLLM does after a restart."""

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/chat/completions":
            name = orjson.loads(request.content)["model"]
            if "@" in name and name not in self.loaded:
                return httpx.Response(404, json={"error": {"message": "not found"}})
        return super().__call__(request)


def test_a_personal_adapter_vllm_lost_is_loaded_again_on_404(tmp_path):
    fake = ForgetfulVLLM()
    with open_client(tmp_path, fake, policy="toy", adapter_poll_seconds=0.02) as c:
        alice = publish_adapter(tmp_path, "toy~alice", 5)
        wait_for_personal(c, 1)
        assert ask(c, "alice").status_code == 200
        fake.loaded.clear()  # vLLM restarted between two health checks
        again = ask(c, "alice")
    assert again.status_code == 200
    loads = [body for path, body in fake.admin if path == "/v1/load_lora_adapter"]
    assert loads == [{"lora_name": alice, "lora_path": f"/adapters/{alice}"}] * 2


KEYS = {"client_keys": (("team-a", "key-a"), ("team-b", "key-b"))}


def test_a_user_belongs_to_the_tenant_of_the_key_it_came_with(tmp_path):
    fake = FakeVLLM()
    with open_client(tmp_path, fake, policy="toy", adapter_poll_seconds=0.02, **KEYS) as c:
        publish_adapter(tmp_path, personal_policy("toy", "team-a:alice"), 1)
        wait_for_personal(c, 1)
        ask(c, "alice", Authorization="Bearer key-a")
        ask(c, "alice", Authorization="Bearer key-b")  # another tenant's alice
        ask(c, None, Authorization="Bearer key-b")
        rows = records(c, submitted=3)
    assert [r["model"] for r in fake.requests] == ["toy~team-a:alice@000001", "toy", "toy"]
    assert [r["user"] for r in rows] == ["team-a:alice", "team-b:alice", "team-b"]


@pytest.mark.parametrize("user", ["x" * 129])
def test_an_overlong_user_header_is_a_400(tmp_path, user):
    fake = FakeVLLM()
    with open_client(tmp_path, fake, policy="toy") as c:
        answer = ask(c, user)
    assert answer.status_code == 400
    assert "X-NextState-User".lower() in answer.json()["error"]["message"].lower()
    assert fake.requests == []


async def test_a_version_retired_since_the_last_poll_is_never_loaded_again(tmp_path):
    """The proxy follows the store a poll behind: when vLLM lacks the version it still
    takes for current, it reads the store before loading, and leaves a retired one out
    (the learner has just unloaded it, and nothing would unload it again)."""
    from nextstate.core.store import Store
    from nextstate.core.vllm import VLLMClient

    fake = FakeVLLM()
    old, new = publish_adapter(tmp_path, "toy", 1), publish_adapter(tmp_path, "toy", 2)
    store = Store(f"sqlite:///{tmp_path}/s.db")
    router = Router("toy", store=store)
    router.update({"toy": (old, f"/adapters/{old}")})  # the last poll, before v2
    vllm = VLLMClient("http://vllm", http=httpx.AsyncClient(
        base_url="http://vllm", transport=httpx.MockTransport(fake)))
    try:
        assert await router.check_loaded(vllm) is False  # v1: retired, not loaded
        assert router.current == new
        assert await router.check_loaded(vllm) is True  # v2: vLLM lost it, loaded again
    finally:
        await vllm.http.aclose()
        store.close()
    assert [body["lora_name"] for path, body in fake.admin
            if path == "/v1/load_lora_adapter"] == [new]


async def test_two_callers_that_find_an_adapter_missing_load_it_once(tmp_path):
    """The health watcher and a request at the same moment: one load, not two."""
    from nextstate.core.store import Store
    from nextstate.core.vllm import VLLMClient

    fake = FakeVLLM()
    name = publish_adapter(tmp_path, "toy", 1)
    store = Store(f"sqlite:///{tmp_path}/s.db")
    router = Router("toy", store=store)
    await router.refresh()
    vllm = VLLMClient("http://vllm", http=httpx.AsyncClient(
        base_url="http://vllm", transport=httpx.MockTransport(fake)))
    try:
        assert await asyncio.gather(router.check_loaded(vllm), router.check_loaded(vllm)) == [
            True, True]
    finally:
        await vllm.http.aclose()
        store.close()
    assert [body["lora_name"] for path, body in fake.admin
            if path == "/v1/load_lora_adapter"] == [name]
