"""Each example runs as a user would run it, against a real proxy and vLLM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(proxy, name: str, *args: str, stdin: str = "") -> str:
    env = {**os.environ, "OPENAI_BASE_URL": proxy.base_url, "OPENAI_API_KEY": "unused"}
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
