"""The ``nextstate`` command line (nextstate.cli): what ``up`` starts, what ``forget`` deletes
and says, what ``rollback`` loads, and one sentence for each newcomer's mistake."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import click
import httpx
import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from nextstate import cli
from nextstate.cli import serve, stack
from nextstate.core import vllm
from nextstate.core.records import TurnRecord
from nextstate.core.store import Store
from nextstate.core.vllm_server import GUARD, VLLMProcess, free_port, stop_group
from nextstate.proxy.app import make_app
from nextstate.proxy.settings import ProxySettings
from tests.proxy.fake_vllm import FakeVLLM


def test_up_passes_personal_after_to_the_learner_it_starts(monkeypatch):
    started = []
    monkeypatch.setattr(stack, "check_backend", lambda url, key: ["toy"])
    monkeypatch.setattr(stack, "spawn", lambda command, log, env: started.append(command))
    monkeypatch.setattr(stack, "stop_group", lambda process: None)
    monkeypatch.setattr(stack, "sampler_logprobs", lambda url, key, model, off: "recompute")
    monkeypatch.setattr(stack, "run_proxy", lambda settings, host, port: None)
    runner = CliRunner()
    assert runner.invoke(cli.main, ["up", "--backend", "http://vllm",
                                    "--personal-after", "8"]).exit_code == 0
    assert runner.invoke(cli.main, ["up", "--backend", "http://vllm"]).exit_code == 0
    with_personal, without = started
    assert with_personal[with_personal.index("--personal-after") + 1] == "8"
    assert "--personal-after" not in without


def started_with(seen: Callable[[Any], None]) -> type:
    """A stand-in for `VLLMProcess` that tells ``seen`` each config it is started with."""

    class Started:
        def __init__(self, config):
            seen(config)
            self.url = "http://127.0.0.1:1"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    return Started


def test_up_starts_vllm_with_a_key_that_only_its_proxy_and_learner_know(monkeypatch):
    seen: list[dict] = []
    monkeypatch.setattr(stack, "VLLMProcess", started_with(
        lambda config: seen.append({"config": config})))
    monkeypatch.setattr(stack, "ensure_toy_model", lambda: Path("/models/toy"))
    monkeypatch.setattr(stack, "spawn", lambda command, log, env: seen[-1].update(
        command=command, env=env))
    monkeypatch.setattr(stack, "stop_group", lambda process: None)
    monkeypatch.setattr(stack, "sampler_logprobs", lambda url, key, model, off: "recompute")
    monkeypatch.setattr(stack, "run_proxy", lambda settings, host, port: seen[-1].update(
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


def test_up_opens_the_image_teachers_routes_on_vllm_for_a_vision_language_model(
        monkeypatch, tmp_path):
    """A VLM's GUI turns are scored through vLLM's render and token-in routes, which
    ``--enable-scale-out`` opens (never through the proxy); a text model's vLLM stays as
    it was asked for."""
    configs: list = []
    monkeypatch.setattr(stack, "VLLMProcess", started_with(configs.append))
    monkeypatch.setattr(stack, "spawn", lambda command, log, env: None)
    monkeypatch.setattr(stack, "stop_group", lambda process: None)
    monkeypatch.setattr(stack, "sampler_logprobs", lambda url, key, model, off: "record")
    monkeypatch.setattr(stack, "run_proxy", lambda settings, host, port: None)
    for name, config in [("vlm", {"vision_config": {}, "image_token_id": 7}), ("text", {})]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    runner = CliRunner()
    for name in ("vlm", "text"):
        assert runner.invoke(cli.main, ["up", "--model", str(tmp_path / name),
                                        "--vllm-arg=--dtype=float32"]).exit_code == 0
    vision, text = configs
    assert vision.extra_args == ("--dtype=float32", "--enable-scale-out")
    assert text.extra_args == ("--dtype=float32",)


def test_up_with_a_backend_sends_the_key_it_is_given(monkeypatch):
    seen = {}
    monkeypatch.setattr(stack, "check_backend", lambda url, key: seen.update(checked=key) or [])
    monkeypatch.setattr(stack, "spawn", lambda command, log, env: seen.update(env=env))
    monkeypatch.setattr(stack, "stop_group", lambda process: None)
    monkeypatch.setattr(stack, "sampler_logprobs", lambda url, key, model, off: "recompute")
    monkeypatch.setattr(stack, "run_proxy", lambda settings, host, port: seen.update(
        settings=settings))
    result = CliRunner().invoke(cli.main, ["up", "--backend", "http://vllm",
                                           "--backend-api-key", "k"])
    assert result.exit_code == 0, result.output
    assert seen["checked"] == "k" and seen["settings"].backend_api_key == "k"
    assert seen["env"]["NEXTSTATE_BACKEND_API_KEY"] == "k"
    assert seen["settings"].sampler_logprobs == "recompute"  # what the check said


def test_up_leaves_sampler_logprobs_to_its_learner_only_where_vllm_allows_it():
    from tests.core.test_doctor import FakeVLLM as Doctored

    def where(vllm, no_learner=False):
        return stack.sampler_logprobs("http://vllm", None, "toy", no_learner,
                                      transport=httpx.MockTransport(vllm))

    assert where(Doctored()) == "recompute"
    assert where(Doctored(sampling_defaults=True)) == "record"  # a generation config's
    assert where(Doctored(), no_learner=True) == "record"  # nobody would recompute them

    def down(request):
        raise httpx.ConnectError("refused", request=request)

    assert where(down) == "record"


@pytest.fixture
def store_url(tmp_path):
    """A store in which alice has two turns and a personal adapter (two versions on
    disk, one of them loaded), beside the shared adapter."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    store.turns.write([TurnRecord(turn_id=f"t{i}", endpoint="chat", created_at=float(i),
                            request={"messages": [{"role": "user", "content": str(i)}]},
                            session_id=f"s{i}", user="alice") for i in range(2)])
    from nextstate.core.store.schema import adapters

    with store.db.engine.begin() as conn:
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
    assert store.adapters.currents("p") == {"p": ("p@000001", str(tmp_path / "p@000001"))}
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
    assert {a["name"]: a["status"] for a in store.adapters.versions()} == {
        "p@000001": "current", "p~alice@000002": "forgotten", "p~alice@000003": "forgotten"}
    store.close()
    # A session or an age never takes adapters, and says nothing about them.
    again = CliRunner().invoke(cli.main, ["forget", "--store", store_url, "--session", "s9"])
    assert again.output == "deleted 0 turns\n"


# -- a newcomer's mistakes: one sentence each, never a traceback --------------------------

def _commands(group: click.Group, prefix: str = "") -> Iterator[tuple[str, click.Command]]:
    for name, command in group.commands.items():
        yield f"{prefix}{name}", command
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix}{name} ")


def test_every_backend_option_takes_the_url_with_or_without_v1():
    found = {}
    for name, command in _commands(cli.main):
        for param in command.params:
            if "--backend" in getattr(param, "opts", ()):
                found[name] = param.process_value(
                    click.Context(command), ("http://h:8000/v1/",) if param.multiple
                    else "http://h:8000/v1/")
    assert set(found) == {"serve", "up", "learn", "forget", "adapters rollback", "doctor"}
    assert all(v in ("http://h:8000", ("http://h:8000",)) for v in found.values()), found


def test_a_backend_that_is_not_a_url_gets_one_sentence():
    result = CliRunner().invoke(cli.main, ["serve", "--backend", "localhost:8000"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "give the vLLM server's address with its scheme, e.g. http://127.0.0.1:8000" \
        in result.output


def test_bench_following_asked_to_measure_nothing_says_what_to_give():
    result = CliRunner().invoke(cli.main, ["bench", "following", "--count", "0"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "nothing to measure: give --count, --per-template or --tone-words" in result.output


def test_serve_with_the_openai_base_url_form_proxies_to_the_right_paths(tmp_path):
    seen: list[str] = []
    fake = FakeVLLM()

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return fake(request)

    settings = ProxySettings(backends=("http://vllm:8000/v1",), store_url=f"sqlite:///"
                             f"{tmp_path}/s.db", spool_dir=tmp_path / "spool")
    assert settings.backend_url == "http://vllm:8000"
    with TestClient(make_app(settings, transport=httpx.MockTransport(upstream))) as client:
        answer = client.post("/v1/chat/completions", json={
            "model": "toy", "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 200
        assert client.get("/health").json()["status"] == "ok"
    assert seen[:2] == ["/v1/chat/completions", "/health"]


class _Answers404(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def not_vllm() -> Iterator[str]:
    """A server that answers, but not as vLLM: 404 for /v1/models."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answers404)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_serve_names_a_backend_that_answers_404_on_models(not_vllm, monkeypatch):
    monkeypatch.setattr(serve, "run_proxy", lambda *a: pytest.fail("must not start"))
    result = CliRunner().invoke(cli.main, ["serve", "--backend", f"{not_vllm}/api",
                                           "--port", str(free_port())])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{not_vllm}/api answers 404 for /v1/models" in result.output
    assert "give its root URL, e.g. http://HOST:8000 (with or without /v1)" in result.output


def test_learn_names_a_backend_that_answers_404_on_models(not_vllm, tmp_path):
    result = CliRunner().invoke(cli.main, [
        "learn", "--backend", f"{not_vllm}/api", "--no-train", "--once",
        "--store", f"sqlite:///{tmp_path / 'store.db'}"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{not_vllm}/api answers 404 for /v1/models" in result.output


def test_serve_starts_while_the_backend_is_down_and_says_so(monkeypatch):
    started = []
    monkeypatch.setattr(serve, "run_proxy", lambda settings, host, port: started.append(settings))
    result = CliRunner().invoke(cli.main, ["serve", "--backend", "http://127.0.0.1:9/v1",
                                           "--port", str(free_port())])
    assert result.exit_code == 0, result.output
    assert "nothing answers at http://127.0.0.1:9" in result.output
    assert "answers 502 until it does" in result.output
    assert started[0].backend_url == "http://127.0.0.1:9"


def test_a_port_in_use_is_named_before_anything_starts(monkeypatch):
    monkeypatch.setattr(serve, "run_proxy", lambda *a: pytest.fail("must not start"))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = CliRunner().invoke(cli.main, ["serve", "--backend", "http://127.0.0.1:9",
                                               "--port", str(port)])
    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.output
    assert "give another --port" in result.output


@pytest.mark.parametrize("command", [["status"], ["export"], ["adapters", "list"],
                                     ["forget", "--session", "s1"]])
def test_commands_that_read_a_store_say_which_one_is_missing(command, tmp_path, monkeypatch):
    monkeypatch.setenv("NEXTSTATE_HOME", str(tmp_path / "fresh"))
    monkeypatch.delenv("NEXTSTATE_STORE", raising=False)
    result = CliRunner().invoke(cli.main, command)
    expected = f"sqlite:///{tmp_path / 'fresh' / 'nextstate.db'}"
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"no store at {expected} (no such file)" in result.output
    assert "--store URL or NEXTSTATE_STORE" in result.output
    assert not (tmp_path / "fresh").exists()  # nothing was created on the way


@pytest.mark.parametrize("store, says", [
    ("nonsense", "'nonsense' is not a database URL"),
    ("postgresql+psycopg://nobody@127.0.0.1:9/db", "cannot be read (connection failed"),
])
def test_a_store_url_that_cannot_work_is_named(store, says):
    result = CliRunner().invoke(cli.main, ["status", "--store", store])
    assert result.exit_code in (1, 2) and "Traceback" not in result.output
    assert says in result.output


def test_status_names_the_store_no_learner_reported_to(store_url):
    result = CliRunner().invoke(cli.main, ["status", "--store", store_url])
    assert result.exit_code == 1
    assert f"no learner has reported to the store at {store_url} yet" in result.output


def test_status_opens_with_the_learning_health_verdict_and_why(store_url):
    store = Store(store_url)
    store.status.write({"state": "idle", "pid": 7, "judge": "rules", "method": "combined",
                        "batch_turns": 16, "counts": {"ready": 3}, "steps": [],
                        "health": {"state": "stalled", "why": [
                            "the last 3 steps: refused, refused, refused"], "fix": []}})
    store.close()
    result = CliRunner().invoke(cli.main, ["status", "--store", store_url])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == (
        "health    stalled: the last 3 steps: refused, refused, refused")


def test_rollback_loads_on_every_backend_before_the_version_is_current(store_url, tmp_path,
                                                                     monkeypatch):
    """``nextstate adapters rollback V --backend A --backend B`` (core.lora.rollback, the
    admin endpoint's path too): V is loaded and verified on A and on B while the store
    still serves the version before; only then is V current."""
    from nextstate.core.store.schema import adapters

    store = Store(store_url)
    with store.db.begin() as conn:
        (tmp_path / "p@000004").mkdir()
        conn.execute(adapters.insert().values(version=4, name="p@000004", policy="p",
                                              status="unloaded", created_at=0.0,
                                              path=str(tmp_path / "p@000004")))
    fakes = {"http://a": FakeVLLM(), "http://b": FakeVLLM()}
    current_at_load: list[str] = []

    def backend(url):
        def handle(request):
            if request.url.path == "/v1/load_lora_adapter":
                current_at_load.append(store.adapters.current("p")["name"])
            return fakes[url](request)
        return handle

    real = vllm.VLLMClient
    monkeypatch.setattr(vllm, "VLLMClient", lambda url, key: real(
        url, key, http=httpx.AsyncClient(transport=httpx.MockTransport(backend(url)))))
    result = CliRunner().invoke(cli.main, ["adapters", "rollback", "4", "--store", store_url,
                                           "--backend", "http://a", "--backend", "http://b"])
    assert result.exit_code == 0, result.output
    assert result.output == "p@000004 is current again\n"
    assert all("p@000004" in fake.loaded for fake in fakes.values())
    assert current_at_load == ["p@000001", "p@000001"]  # not current before both had it
    assert store.adapters.current("p")["name"] == "p@000004"
    assert {a["name"]: a["status"] for a in store.adapters.versions("p")}["p@000001"] \
        == "previous"
    store.close()


@pytest.mark.parametrize(("status", "directory", "says"), [
    ("refused", True, "no published version 4"),
    ("failed", True, "no published version 4"),
    ("forgotten", True, "no published version 4"),
    ("previous", False, "p@000004's directory is gone"),
])
def test_rollback_refuses_a_version_that_may_not_or_cannot_serve(
        store_url, tmp_path, monkeypatch, status, directory, says):
    from nextstate.core.store.schema import adapters

    store = Store(store_url)
    with store.db.begin() as conn:
        if directory:
            (tmp_path / "p@000004").mkdir()
        conn.execute(adapters.insert().values(version=4, name="p@000004", policy="p",
                                              status=status, created_at=0.0,
                                              path=str(tmp_path / "p@000004")))
    fake = FakeVLLM()
    real = vllm.VLLMClient
    monkeypatch.setattr(vllm, "VLLMClient", lambda url, key: real(
        url, key, http=httpx.AsyncClient(transport=httpx.MockTransport(fake))))
    result = CliRunner().invoke(cli.main, ["adapters", "rollback", "4", "--store", store_url,
                                           "--backend", "http://a"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert says in result.output
    assert fake.admin == []  # nothing was loaded
    assert store.adapters.current("p")["name"] == "p@000001"  # nothing changed
    store.close()


def test_learn_serves_its_metrics_and_tracks_its_run_where_told(tmp_path, monkeypatch):
    """``--metrics-port`` serves while it runs, ``--track`` opens a run under
    ``--track-dir`` with the learner's settings (steps come with training: the
    integration tests read them back)."""
    from prometheus_client.parser import text_string_to_metric_families
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nextstate.learner import metrics

    scraped: list[str] = []
    closing = metrics.LearnerMetrics.close

    def scrape_then_close(self):  # the last moment the server is up
        port = self._server[0].server_port
        scraped.append(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
        closing(self)

    monkeypatch.setattr(metrics.LearnerMetrics, "close", scrape_then_close)
    monkeypatch.setenv("NEXTSTATE_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(cli.main, [
        "learn", "--backend", "http://127.0.0.1:9", "--no-train", "--once",
        "--store", f"sqlite:///{tmp_path / 's.db'}", "--metrics-port", "0",
        "--track", "tensorboard", "--track-dir", str(tmp_path / "runs"), "--batch-turns", "7"])
    assert result.exit_code == 0, result.output
    assert "learner metrics on http://127.0.0.1:" in result.output
    assert "tracking the steps with tensorboard" in result.output
    families = {f.name for f in text_string_to_metric_families(scraped[0])}
    assert {"nextstate_learner_turns", "nextstate_learner_state"} <= families
    [run] = (tmp_path / "runs" / "tensorboard").iterdir()
    events = EventAccumulator(str(run))
    events.Reload()
    [config] = events.Tensors("config/text_summary")
    assert "batch_turns: 7" in config.tensor_proto.string_val[0].decode()


def test_learn_with_a_tracker_that_is_not_installed_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails
    result = CliRunner().invoke(cli.main, [
        "learn", "--backend", "http://127.0.0.1:9", "--no-train", "--once",
        "--store", f"sqlite:///{tmp_path / 's.db'}", "--track", "wandb",
        "--track-dir", str(tmp_path / "runs")])
    assert result.exit_code == 1
    assert "--track wandb: wandb is not installed: pip install 'nextstate[track]'" in \
        result.output


def test_up_builds_the_toy_model_in_a_child_and_never_imports_torch_itself(tmp_path):
    """`nextstate up` runs for hours: torch (and the native libraries under it, which
    print their teardown noise at Ctrl-C) stays in the child that builds the model."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", (
        "import sys\n"
        "from nextstate.cli.options import ensure_toy_model\n"
        "path = ensure_toy_model(progress=False)\n"
        "assert (path / 'config.json').exists(), path\n"
        "assert ensure_toy_model(progress=False) == path\n"
        "print('torch' in sys.modules)\n")], capture_output=True, text=True, timeout=300,
        env={**os.environ, "NEXTSTATE_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_bench_learning_passes_its_recipe_to_the_benchmark(monkeypatch, tmp_path):
    from nextstate.experiment import bench as experiment_bench

    configs = []

    def run_benchmark(personas, methods, config, out, seeds, progress):
        configs.append((methods, config))
        (out / "results.md").parent.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text("table\n")
        return {"wall_seconds": 1.0}

    monkeypatch.setattr(experiment_bench, "run_benchmark", run_benchmark)
    runner = CliRunner()
    args = ["bench", "learning", "--persona", "student-own-words", "--method", "combined",
            "--out", str(tmp_path)]
    assert runner.invoke(cli.main, args).exit_code == 0
    assert runner.invoke(cli.main, [*args, "--teacher", "policy", "--learning-rate",
                                    "2e-3", "--memory-lessons", "3"]).exit_code == 0
    (_, default), (methods, chosen) = configs
    assert (default.teacher, default.learning_rate, default.memory_lessons) == (
        "base", None, None)
    assert methods == ("combined",) and chosen.teacher == "policy"
    assert chosen.learning_rate == 2e-3 and chosen.memory_lessons == 3
    wrong = runner.invoke(cli.main, [*args, "--teacher", "judge"])
    assert wrong.exit_code == 2 and "'judge' is not one of" in wrong.output


def test_a_spawned_child_answers_sigint_even_when_its_parent_ignores_it(tmp_path):
    # A shell's background job (`nohup make test &`) starts with SIGINT ignored; a child
    # that inherited that would never stop on the learner's Ctrl-C.
    import signal

    from nextstate.core.vllm_server import spawn

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        child = spawn([sys.executable, "-c", "import signal, time; print(signal.getsignal("
                       "signal.SIGINT), flush=True); time.sleep(60)"], tmp_path / "child.log")
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        deadline = time.monotonic() + 30
        while "handler" not in (tmp_path / "child.log").read_text():
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.05)
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=30) != 0
    finally:
        stop_group(child)
    assert "KeyboardInterrupt" in (tmp_path / "child.log").read_text()
