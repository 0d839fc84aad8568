"""The ``nextstate`` command line: what ``up`` starts."""

from __future__ import annotations

from click.testing import CliRunner

from nextstate.proxy import cli


def test_up_passes_personal_after_to_the_learner_it_starts(monkeypatch):
    started = []
    monkeypatch.setattr(cli, "check_backend", lambda url: ["toy"])
    monkeypatch.setattr(cli, "spawn", lambda command, log: started.append(command))
    monkeypatch.setattr(cli, "stop_group", lambda process: None)
    monkeypatch.setattr(cli, "run_proxy", lambda settings, host, port: None)
    runner = CliRunner()
    assert runner.invoke(cli.main, ["up", "--backend", "http://vllm",
                                    "--personal-after", "8"]).exit_code == 0
    assert runner.invoke(cli.main, ["up", "--backend", "http://vllm"]).exit_code == 0
    with_personal, without = started
    assert with_personal[with_personal.index("--personal-after") + 1] == "8"
    assert "--personal-after" not in without
