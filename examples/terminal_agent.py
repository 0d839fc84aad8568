"""A coding/terminal agent loop through nextstate: the tool runs a shell command.

Run `make run` in another terminal, then:

    OPENAI_BASE_URL=http://127.0.0.1:8400/v1 python examples/terminal_agent.py "list the files"

Each step asks the model for a command (a `run` tool call, or else the first line of its
reply), runs it in a scratch directory, and sends back the exit code and output as the
tool's result. That result is the turn's next state: a non-zero exit code is evidence
against the command. The last step's result is sent with the session's end, so even the
final command is judged. (The untrained toy model proposes nonsense commands, which fail:
that is a next state too.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile

from nextstate.adapters.openai import Session

RUN = {"type": "function", "function": {
    "name": "run", "description": "Run a shell command in the working directory.",
    "parameters": {"type": "object", "properties": {"command": {"type": "string"}},
                   "required": ["command"]}}}


def run(command: str, cwd: str, timeout: float = 10.0) -> str:
    try:
        done = subprocess.run(command, shell=True, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return "exit code: timeout"
    output = (done.stdout + done.stderr)[-2000:]
    return f"exit code: {done.returncode}\n{output}"


def main() -> None:
    parser = argparse.ArgumentParser(description="A terminal agent through nextstate")
    parser.add_argument("task", nargs="?", default="Create a file named hello.txt.")
    parser.add_argument("--model", default="nextstate-toy")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    session = Session()
    client = session.client()
    messages: list[dict] = [
        {"role": "system", "content": "You operate a Linux shell. Call `run` with one command."},
        {"role": "user", "content": args.task}]
    with tempfile.TemporaryDirectory() as workdir:
        for step in range(args.steps):
            reply = client.chat.completions.create(model=args.model, messages=messages,
                                                   tools=[RUN], max_tokens=48)
            message = reply.choices[0].message
            calls = message.tool_calls or []
            if calls:
                command = json.loads(calls[0].function.arguments).get("command", "")
                call_id = calls[0].id
            else:  # no tool call: take the first line as the command, like a plain REPL
                command = (message.content or "").strip().splitlines()[0:1] or [""]
                command, call_id = command[0], f"call_{step}"
            result = run(command, workdir)
            print(f"$ {command}\n{result}")
            messages.append({"role": "assistant", "content": message.content, "tool_calls": [
                {"id": call_id, "type": "function",
                 "function": {"name": "run", "arguments": json.dumps({"command": command})}}]})
            messages.append({"role": "tool", "tool_call_id": call_id, "content": result})
        # The loop ends on a tool result no further request will carry: report it.
        session.next_state([messages[-1]], done=True)
    print(f"session: {session.id}")


if __name__ == "__main__":
    main()
