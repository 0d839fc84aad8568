"""A Claude-Code-style tool loop on the Anthropic SDK, through nextstate.

Claude Code speaks only Anthropic Messages (``ANTHROPIC_BASE_URL``), always streams,
sends the whole conversation each turn and answers each ``tool_use`` block with a
``tool_result`` (``is_error`` when the tool failed). The proxy records every turn with
its exact tokens and pairs them into one session with no session header: a turn's next
state is its tool results (a failed one flagged as an error) or the user's next words.
Run `make run` in another terminal, then:

    ANTHROPIC_BASE_URL=http://127.0.0.1:8400 python examples/claude_code_loop.py \\
        "What is in this directory?" "Thanks, now in one line"

Each argument is one user message; between them the model may call the ``bash`` tool,
which runs only a few read-only commands (``ls``, ``pwd``, ``echo``, ``cat``).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
from typing import Any

import anthropic

ALLOWED = {"ls", "pwd", "echo", "cat"}
BASH = {"name": "bash", "description": "Run a bash command.",
        "input_schema": {"type": "object", "properties": {"command": {"type": "string"}},
                         "required": ["command"]}}


def run_bash(tool_input: Any) -> tuple[str, bool]:
    """The tool: (its output, whether it failed)."""
    command = tool_input.get("command", "") if isinstance(tool_input, dict) else ""
    argv = shlex.split(str(command))
    if not argv or argv[0] not in ALLOWED:
        return f"command not allowed: {command!r}", True
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    return (done.stdout[-2000:] + done.stderr[-500:]) or "(no output)", done.returncode != 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", nargs="+", help="the user's messages, in turn")
    parser.add_argument("--model", default="nextstate-toy")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--tool-steps", type=int, default=3, help="tool calls per prompt")
    args = parser.parse_args()
    client = anthropic.Anthropic()
    system = [{"type": "text", "text": "You are Claude Code, a coding agent."}]
    messages: list[dict[str, Any]] = []
    # (this SDK takes sampling options the Messages API has beside its own in extra_body)
    sampling: dict[str, Any] = {} if args.temperature is None else {
        "extra_body": {"temperature": args.temperature}}
    for prompt in args.prompts:
        messages.append({"role": "user", "content": prompt})
        for _ in range(args.tool_steps + 1):
            with client.messages.stream(model=args.model, max_tokens=args.max_tokens,
                                        system=system, tools=[BASH],
                                        messages=messages, **sampling) as stream:
                turn_id = stream.response.headers.get("x-nextstate-turn-id")
                final = stream.get_final_message()
            print(f"turn: {turn_id}")
            messages.append({"role": "assistant", "content": [
                block.model_dump(exclude_none=True) for block in final.content]})
            calls = [block for block in final.content if block.type == "tool_use"]
            for block in final.content:
                if block.type == "text":
                    print(f"assistant: {block.text}")
            if not calls:
                break
            results = []
            for call in calls:
                output, failed = run_bash(call.input)
                print(f"bash {call.input} -> {'error' if failed else 'ok'}")
                results.append({"type": "tool_result", "tool_use_id": call.id,
                                "content": output, "is_error": failed})
            messages.append({"role": "user", "content": results})


if __name__ == "__main__":
    main()
