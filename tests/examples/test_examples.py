"""Each example runs as a user would run it, against a real proxy and vLLM."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(proxy, name: str, *args: str, stdin: str = "") -> str:
    env = {**os.environ, "OPENAI_BASE_URL": proxy.base_url, "OPENAI_API_KEY": "unused",
           "ANTHROPIC_BASE_URL": proxy.url, "ANTHROPIC_API_KEY": "unused"}
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_chat_loop_records_turns_next_states_and_feedback(proxy):
    out = run_example(proxy, "openai_chat_loop.py", "--max-tokens", "6",
                      stdin="Hello\nNo, shorter please\n-1 one word only\n\n")
    assert "feedback -1 recorded" in out
    turns = proxy.turns(2)
    assert turns[0]["session_id"] == turns[1]["session_id"]
    assert turns[0]["next_state"] == [{"role": "user", "content": "No, shorter please"}]
    for _ in range(100):
        turns = proxy.turns(2)
        if turns[1]["feedback"]:
            break
    assert turns[1]["feedback"][0]["hint"] == "one word only"


def test_langchain_agent_runs_as_one_session(proxy):
    out = run_example(proxy, "langchain_agent.py", "What is 6 * 7?", "--steps", "2")
    session = out.split("session: ")[1].split()[0]
    turns = proxy.turns(1, session_id=session)
    assert turns and all(t["turn_type"] == "main" for t in turns)
    assert turns[0]["request"]["tools"][0]["function"]["name"] == "multiply"


def test_terminal_agent_exit_codes_become_next_states(proxy):
    out = run_example(proxy, "terminal_agent.py", "--steps", "2")
    session = out.strip().splitlines()[-1].split("session: ")[1]
    turns = proxy.turns(2, session_id=session)
    assert len(turns) == 2
    for turn in proxy.turns(2, session_id=session, next_state_status="paired"):
        [result] = turn["next_state"]
        assert result["role"] == "tool" and result["content"].startswith("exit code: ")
    assert len(proxy.turns(2, session_id=session, next_state_status="paired")) == 2


def paired(proxy, turn_id: str) -> dict:
    """The store's turns by id, once ``turn_id`` has its next turn (written apart)."""
    deadline = time.monotonic() + 20
    while True:
        turns = {t["turn_id"]: t for t in proxy.turns(0)}
        if turns.get(turn_id, {}).get("next_turn_id") in turns or time.monotonic() > deadline:
            return turns
        time.sleep(0.05)


@pytest.mark.parametrize("chain", [False, True], ids=["resent", "previous_response_id"])
def test_codex_style_loop_records_one_session_with_tool_outputs(proxy, chain):
    out = run_example(proxy, "codex_responses_loop.py", "List the files", "--steps", "2",
                      "--force-tools", "--max-tokens", "40", "--temperature", "0",
                      *(["--chain"] if chain else []))
    first = out.split("turn 0: ")[1].split()[0]
    turns = paired(proxy, first)
    one = turns[first]
    assert one["next_state_kind"] == "tool" and one["endpoint"] == "responses"
    [output] = one["next_state"]
    assert output["role"] == "tool" and output["content"].startswith("error: ")
    assert turns[one["next_turn_id"]]["session_id"] == one["session_id"]


def test_claude_code_style_loop_records_one_session(proxy):
    out = run_example(proxy, "claude_code_loop.py", "What is here?", "Shorter please",
                      "--max-tokens", "8", "--temperature", "0")
    ids = [line.split("turn: ")[1] for line in out.splitlines() if line.startswith("turn: ")]
    assert len(ids) >= 2
    turns = paired(proxy, ids[0])
    assert len({turns[i]["session_id"] for i in ids}) == 1
    assert turns[ids[0]]["next_turn_id"] == ids[1]
    assert all(turns[i]["completion_token_ids"] for i in ids)
