"""`nextstate doctor` without a stack: every problem is a line with its fix and the exit
code says whether learning is blocked (the live checks: tests/core/test_doctor.py; the
real stack: tests/integration/test_doctor.py)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from nextstate.cli import main
from nextstate.cli.doctor import render
from nextstate.core.health import Finding
from nextstate.core.store import Store


def test_nothing_running_and_no_store_is_named_line_by_line_with_exit_code_1(
        tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["doctor", "--proxy", "http://127.0.0.1:9",
                                       "--store", f"sqlite:///{tmp_path / 'none.db'}"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.splitlines()
    assert any(line.startswith("BLOCK no proxy answers at http://127.0.0.1:9") for line in lines)
    assert any("Fix: give doctor --backend" in line for line in lines)
    assert lines[-1].startswith("health: blocked")


def test_json_gives_the_same_findings_and_the_verdict(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    Store(url).db.ensure_schema()
    result = CliRunner().invoke(main, ["doctor", "--json", "--proxy", "", "--store", url])
    assert result.exit_code == 1
    body = json.loads(result.output)
    assert body["health"]["state"] == "blocked"
    checks = {f["check"]: f["level"] for f in body["findings"]}
    assert checks["store"] == "ok"
    assert checks["learner.running"] == "block"  # nobody learns from this store
    assert checks["vllm.reachable"] == "block"


def test_blocks_come_first_and_ok_lines_carry_no_fix() -> None:
    text = render([Finding("a", "ok", "fine", fix="nothing to do"),
                   Finding("b", "block", "broken", "it matters", "do this")],
                  {"state": "blocked", "why": ["broken"]})
    assert text.splitlines() == ["BLOCK broken: it matters. Fix: do this", "ok    fine", "",
                                 "health: blocked (broken)"]
