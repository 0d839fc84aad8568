"""A Codex-style tool loop on the OpenAI Responses API, through nextstate.

Codex CLI speaks only the Responses API: instructions, a ``shell`` tool, and the whole
conversation sent again each turn (``store: false``), or only what is new with
``previous_response_id`` (``--chain``). Each ``function_call`` is run and its
``function_call_output`` goes back to the model; the proxy records every turn with its
exact tokens and pairs them into one session, the tool outputs as next states, with no
session header. Run `make run` in another terminal, then:

    OPENAI_BASE_URL=http://127.0.0.1:8400/v1 python examples/codex_responses_loop.py \\
        "List the files here"

The shell tool runs only a few read-only commands (``ls``, ``pwd``, ``echo``, ``cat``);
anything else comes back to the model as an error, as a sandbox would refuse it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
from typing import Any

import openai

ALLOWED = {"ls", "pwd", "echo", "cat"}
SHELL = {"type": "function", "name": "shell", "description": "Run a shell command.",
         "parameters": {"type": "object", "properties": {"command": {"type": "string"}},
                        "required": ["command"]}}


def run_shell(arguments: str) -> str:
    """The tool: a JSON object with a command, run if it is a read-only one."""
    try:
        command = json.loads(arguments).get("command", "")
        argv = shlex.split(str(command))
    except (json.JSONDecodeError, AttributeError, ValueError):
        return "error: the arguments must be a JSON object with a 'command' string"
    if not argv or argv[0] not in ALLOWED:
        return f"error: command not allowed: {command!r}"
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    return f"exit code: {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-500:]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task")
    parser.add_argument("--model", default="nextstate-toy")
    parser.add_argument("--steps", type=int, default=4, help="at most this many turns")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--chain", action="store_true",
                        help="send only what is new, with previous_response_id")
    parser.add_argument("--force-tools", action="store_true",
                        help="tool_choice=required (a small model rarely calls tools)")
    args = parser.parse_args()
    client = openai.OpenAI()
    items: list[Any] = [{"role": "user", "content": args.task}]
    previous: str | None = None
    for step in range(args.steps):
        raw = client.responses.with_raw_response.create(
            model=args.model, instructions="You are a coding agent. Use the shell tool.",
            input=items, tools=[SHELL], max_output_tokens=args.max_tokens,
            tool_choice="required" if args.force_tools else "auto",
            store=args.chain, **({"previous_response_id": previous} if previous else {}),
            **({} if args.temperature is None else {"temperature": args.temperature}))
        response = raw.parse()
        print(f"turn {step}: {raw.headers.get('x-nextstate-turn-id')}")
        calls = [item for item in response.output if item.type == "function_call"]
        if response.output_text:
            print(f"assistant: {response.output_text}")
        if not calls:
            break
        outputs = []
        for call in calls:
            result = run_shell(call.arguments)
            print(f"shell {call.arguments} -> {result.splitlines()[0]}")
            outputs.append({"type": "function_call_output", "call_id": call.call_id,
                            "output": result})
        if args.chain:
            previous, items = response.id, outputs
        else:
            items += [item.model_dump(exclude_none=True) for item in response.output]
            items += outputs


if __name__ == "__main__":
    main()
