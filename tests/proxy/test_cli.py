"""The ``nextstate`` command line: what ``up`` starts, what ``forget`` deletes and says."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from nextstate.core import vllm
from nextstate.proxy import cli
from nextstate.proxy.backend import GUARD, VLLMProcess
from nextstate.proxy.record import TurnRecord
from nextstate.proxy.store import Store
from tests.proxy.fake_vllm import FakeVLLM


def test_up_passes_personal_after_to_the_learner_it_starts(monkeypatch):
    started = []
    monkeypatch.setattr(cli, "check_backend", lambda url, key: ["toy"])
    monkeypatch.setattr(cli, "spawn", lambda command, log, env: started.append(command))
    monkeypatch.setattr(cli, "stop_group", lambda process: None)
    monkeypatch.setattr(cli, "run_proxy", lambda settings, host, port: None)
    runner = CliRunner()
    assert runner.invoke(cli.main, ["up", "--backend", "http://vllm",
                                    "--personal-after", "8"]).exit_code == 0
    assert runner.invoke(cli.main, ["up", "--backend", "http://vllm"]).exit_code == 0
    with_personal, without = started
    assert with_personal[with_personal.index("--personal-after") + 1] == "8"
    assert "--personal-after" not in without


def test_up_starts_vllm_with_a_key_that_only_its_proxy_and_learner_know(monkeypatch):
    seen: list[dict] = []

    class Started:
        def __init__(self, config):
            seen.append({"config": config})
            self.url = "http://127.0.0.1:1"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(cli, "VLLMProcess", Started)
    monkeypatch.setattr(cli, "_ensure_toy_model", lambda: Path("/models/toy"))
    monkeypatch.setattr(cli, "spawn", lambda command, log, env: seen[-1].update(
        command=command, env=env))
    monkeypatch.setattr(cli, "stop_group", lambda process: None)
    monkeypatch.setattr(cli, "run_proxy", lambda settings, host, port: seen[-1].update(
        settings=settings))
    monkeypatch.setenv("NEXTSTATE_BACKEND_API_KEY", "")
    runner = CliRunner()
    assert runner.invoke(cli.main, ["up"]).exit_code == 0
    assert runner.invoke(cli.main, ["up"]).exit_code == 0
    first, second = seen
    key = first["config"].api_key
    assert key and len(key) >= 32 and key != second["config"].api_key  # random each time
    assert first["settings"].backend_api_key == key  # the proxy sends it
    assert first["env"]["NEXTSTATE_BACKEND_API_KEY"] == key  # the learner gets it...
    assert key not in " ".join(first["command"])  # ...where `ps` does not show it
    command = VLLMProcess(first["config"]).command()
    assert command[command.index("--middleware") + 1] == GUARD and key not in command


def test_up_with_a_backend_sends_the_key_it_is_given(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "check_backend", lambda url, key: seen.update(checked=key) or [])
    monkeypatch.setattr(cli, "spawn", lambda command, log, env: seen.update(env=env))
    monkeypatch.setattr(cli, "stop_group", lambda process: None)
    monkeypatch.setattr(cli, "run_proxy", lambda settings, host, port: seen.update(
        settings=settings))
    result = CliRunner().invoke(cli.main, ["up", "--backend", "http://vllm",
                                           "--backend-api-key", "k"])
    assert result.exit_code == 0, result.output
    assert seen["checked"] == "k" and seen["settings"].backend_api_key == "k"
    assert seen["env"]["NEXTSTATE_BACKEND_API_KEY"] == "k"


@pytest.fixture
def store_url(tmp_path):
    """A store in which alice has two turns and a personal adapter (two versions on
    disk, one of them loaded), beside the shared adapter."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    store.write([TurnRecord(turn_id=f"t{i}", endpoint="chat", created_at=float(i),
                            request={"messages": [{"role": "user", "content": str(i)}]},
                            session_id=f"s{i}", user="alice") for i in range(2)])
    from nextstate.proxy.store.schema import adapters

    with store.engine.begin() as conn:
        for version, policy, status in ((1, "p", "current"), (2, "p~alice", "previous"),
                                        (3, "p~alice", "current")):
            name = f"{policy}@{version:06d}"
            (tmp_path / name).mkdir()
            conn.execute(adapters.insert().values(
                version=version, name=name, policy=policy, status=status,
                path=str(tmp_path / name), created_at=0.0))
    store.close()
    return url


def test_forgetting_a_user_unloads_and_deletes_their_adapters(store_url, tmp_path,
                                                              monkeypatch):
    fake = FakeVLLM(api_key="k")
    fake.loaded = {"p@000001", "p~alice@000003"}
    real = vllm.VLLMClient
    monkeypatch.setattr(vllm, "VLLMClient", lambda url, key: real(
        url, key, http=httpx.AsyncClient(transport=httpx.MockTransport(fake))))
    result = CliRunner().invoke(cli.main, ["forget", "--store", store_url, "--user", "alice",
                                           "--backend", "http://vllm", "--backend-api-key", "k"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "deleted 2 turns",
        "forgot 2 personal adapter versions (p~alice@000002, p~alice@000003): the proxy "
        "serves their users the shared adapter from its next look at the store",
        "deleted 2 adapter directories",
        "unloaded from http://vllm: p~alice@000003"]
    assert fake.loaded == {"p@000001"} and fake.unauthorized == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["p@000001"]
    store = Store(store_url)
    assert store.current_adapters("p") == {"p": ("p@000001", str(tmp_path / "p@000001"))}
    store.close()


def test_rollback_loads_the_version_with_the_backends_key(store_url, monkeypatch):
    fake = FakeVLLM(api_key="k")
    real = vllm.VLLMClient
    monkeypatch.setattr(vllm, "VLLMClient", lambda url, key: real(
        url, key, http=httpx.AsyncClient(transport=httpx.MockTransport(fake))))
    result = CliRunner().invoke(cli.main, ["adapters", "rollback", "2", "--store", store_url,
                                           "--backend", "http://vllm"])
    assert result.exit_code != 0 and "401" in result.output  # no key: vLLM refuses
    result = CliRunner().invoke(cli.main, ["adapters", "rollback", "1", "--store", store_url,
                                           "--backend", "http://vllm", "--backend-api-key",
                                           "k"])
    assert result.exit_code == 0, result.output
    assert "p@000001" in fake.loaded and fake.unauthorized == ["POST /v1/load_lora_adapter"]


def test_forgetting_without_a_reachable_backend_says_what_vllm_may_keep(store_url):
    unreachable = CliRunner().invoke(cli.main, [
        "forget", "--store", store_url, "--user", "alice", "--backend", "http://127.0.0.1:9"])
    assert unreachable.exit_code == 0, unreachable.output
    assert "could not reach http://127.0.0.1:9" in unreachable.output
    assert "may keep them loaded until it restarts" in unreachable.output
    assert "deleted 2 adapter directories" in unreachable.output


def test_forgetting_without_a_backend_still_forgets_and_says_so(store_url, monkeypatch):
    monkeypatch.delenv("NEXTSTATE_BACKEND", raising=False)
    result = CliRunner().invoke(cli.main, ["forget", "--store", store_url, "--user", "alice"])
    assert result.exit_code == 0, result.output
    assert "forgot 2 personal adapter versions" in result.output
    assert "no --backend given: a vLLM that has them loaded keeps them until it restarts" \
        in result.output
    store = Store(store_url)
    assert {a["name"]: a["status"] for a in store.adapter_versions()} == {
        "p@000001": "current", "p~alice@000002": "forgotten", "p~alice@000003": "forgotten"}
    store.close()
    # A session or an age never takes adapters, and says nothing about them.
    again = CliRunner().invoke(cli.main, ["forget", "--store", store_url, "--session", "s9"])
    assert again.output == "deleted 0 turns\n"
