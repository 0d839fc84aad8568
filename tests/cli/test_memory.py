"""``nextstate memory`` and the memory's flags on serve, up and learn."""

from __future__ import annotations

import orjson
from click.testing import CliRunner

from nextstate import cli
from nextstate.cli import serve, stack
from nextstate.core import vllm_server
from nextstate.core.store import Store
from nextstate.proxy.settings import MemorySettings


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli.main, list(args))
    return result.exit_code, result.output


def test_lessons_are_listed_added_edited_pinned_and_forgotten(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    store = Store(url)
    learned, _ = store.lessons.learn("Show the steps.", tenant="t", user="t:alice",
                                     turn_id="x")
    store.close()
    code, out = run("memory", "add", "Always answer in French.", "--tenant", "t",
                    "--store", url)
    assert code == 0, out
    written = out.strip()
    code, out = run("memory", "list", "--store", url, "--tenant", "t", "--json")
    rows = {r["id"]: r for r in map(orjson.loads, out.splitlines())}
    assert set(rows) == {learned, written}
    assert rows[written]["pinned"] and not rows[learned]["pinned"]
    assert run("memory", "edit", learned, "Show every step.", "--store", url)[0] == 0
    assert run("memory", "pin", learned, "--store", url)[0] == 0
    store = Store(url)
    store.handover.decide("t", "t:alice", "weights", "no better with lessons", {})
    store.close()
    code, out = run("memory", "list", "--store", url)
    assert "Show every step." in out and "t:alice" in out and "tenant t" in out
    assert "handed over to the weights: t:alice: no better with lessons" in out
    assert run("memory", "pin", learned, "--off", "--store", url)[0] == 0
    assert run("memory", "forget", "--user", "t:alice", "--store", url) == (
        0, "forgot 1 lesson(s)\n")
    store = Store(url)
    assert store.handover.modes() == {}  # alice's memory starts over
    store.close()
    code, out = run("memory", "forget", learned, "--store", url)
    assert code == 1 and f"no lesson {learned}" in out
    store = Store(url)
    [left] = store.lessons.find(every_tenant=True)
    store.close()
    assert left["id"] == written and left["text"] == "Always answer in French."


def test_memory_forget_needs_a_lesson_or_whose(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    Store(url).close()
    code, out = run("memory", "forget", "--store", url)
    assert code == 2 and "give a lesson id" in out


def test_serve_turns_the_memory_and_capture_on_and_off(monkeypatch):
    seen = []
    monkeypatch.setattr(serve, "run_proxy", lambda settings, host, port: seen.append(settings))
    monkeypatch.setattr(serve, "free_port_or_fail", lambda host, port: None)
    monkeypatch.setattr(vllm_server, "check_backend", lambda url, api_key: ["toy"])
    assert run("serve", "--backend", "http://vllm", "--memory", "--memory-for", "team-a",
               "--no-capture")[0] == 0
    assert run("serve", "--backend", "http://vllm")[0] == 0
    on, off = seen
    assert on.memory.enabled and on.memory.only == ("team-a",) and not on.capture
    assert not off.memory.enabled and off.capture
    assert run("serve", "--backend", "http://vllm", "--memory-for", "x")[0] == 2
    code, out = run("serve", "--backend", "http://vllm", "--memory-lessons", "2")
    assert code == 2 and "--memory-lessons needs --memory" in out
    assert run("serve", "--backend", "http://vllm", "--memory", "--memory-lessons", "0")[0] == 2
    assert run("serve", "--backend", "http://vllm", "--memory", "--memory-lessons", "2")[0] == 0
    assert seen[-1].memory.lessons == 2 and on.memory.lessons == MemorySettings().lessons
    assert on.memory.control == MemorySettings().control
    assert run("serve", "--backend", "http://vllm", "--memory", "--memory-control", "0")[0] == 0
    assert seen[-1].memory.control == 0
    code, out = run("serve", "--backend", "http://vllm", "--memory", "--memory-control", "0.5")
    assert code == 2 and "0.5" in out
    code, out = run("serve", "--backend", "http://vllm", "--memory-control", "0.1")
    assert code == 2 and "--memory-control needs --memory" in out


def test_serve_in_front_of_any_provider_does_not_insist_on_vllm(monkeypatch):
    """A hosted API refuses the proxy's keyless look at /v1/models (its clients bring
    their key): with --no-capture that is a warning, not a refusal."""
    from nextstate.core.vllm_server import BackendStartError

    def refuses(url, api_key):
        raise BackendStartError(f"{url} refused a request without a key (401)")

    seen = []
    monkeypatch.setattr(serve, "run_proxy", lambda settings, host, port: seen.append(settings))
    monkeypatch.setattr(serve, "free_port_or_fail", lambda host, port: None)
    monkeypatch.setattr(vllm_server, "check_backend", refuses)
    code, out = run("serve", "--backend", "https://api.example.com/v1", "--no-capture",
                    "--memory")
    assert code == 0 and "warning" in out and seen
    assert run("serve", "--backend", "https://api.example.com/v1")[0] == 1


def test_up_with_memory_starts_a_learner_that_learns_lessons(monkeypatch):
    started, served = [], []
    monkeypatch.setattr(stack, "check_backend", lambda url, key: ["toy"])
    monkeypatch.setattr(stack, "spawn", lambda command, log, env: started.append(command))
    monkeypatch.setattr(stack, "stop_group", lambda process: None)
    monkeypatch.setattr(stack, "run_proxy", lambda settings, host, port: served.append(settings))
    monkeypatch.setattr(stack, "sampler_logprobs", lambda url, key, model, off: "record")
    assert run("up", "--backend", "http://vllm", "--memory", "--memory-lessons", "3",
               "--memory-control", "0.1")[0] == 0
    assert "--memory" in started[0] and served[0].memory.enabled
    assert served[0].memory.lessons == 3 and served[0].memory.control == 0.1


def test_status_says_what_the_memory_holds_and_why_lessons_left():
    from nextstate.cli.learn import render_status

    report = {"state": "idle", "counts": {}, "memory": {
        "learning": True, "counts": {"active": 3, "retired": 2, "dropped": 1, "pinned": 0},
        "retired": [{"status": "retired", "text": "Show the steps.", "status_at": 1.0,
                     "status_reason": "p@000004 follows it without being told"}],
        "dropped": [], "waiting": ["alice: 1 of 4 held-out prompts"],
        "handed_over": [{"tenant": None, "user": "bob", "since": 2.0,
                         "reason": "judged turns served without lessons scored +0.50"}],
        "handed_over_count": 5}}
    text = render_status(report)
    assert "memory    lessons: 3 served, 2 retired" in text
    assert "'Show the steps.': p@000004 follows it without being told" in text
    assert "not checked yet: alice: 1 of 4 held-out prompts" in text
    assert "handed over to the weights" in text
    assert ": bob: judged turns served without lessons scored +0.50" in text
    assert "and 4 more handed over" in text
