"""What translating a dialect costs the proxy in CPU: per request, and per streamed chunk.

agent -(Messages | Responses)-> proxy -(chat)-> vLLM. The translators
(`nextstate.proxy.dialects`) are pure functions, so their cost is measured alone, in
process, with CPU time (``time.process_time``). A dialect request's JSON work (parse the
dialect body, translate, add capture, serialize; parse the chat answer, translate back,
serialize) stands beside the chat relay's for the same conversation (parse, add capture,
serialize; parse the answer, strip it, serialize); a streamed chunk's (parse, make the
dialect's events) beside chat's (parse, strip, serialize). HTTP and recording, the same
for both, are left out. Workloads are a coding agent's:
a Claude-Code-like Messages request (billing header, a long system prompt, 8 tools, a
24-message tool loop) and a Codex-like Responses request (instructions, 8 tools, the same
loop as 24 items); answers are vLLM 0.32-shaped chat answers with token ids and
logprobs (`fake_upstream`), 32 completion tokens; a stream is its 34 chunks.

    python -m bench.dialects_bench            # ~1 minute
    python -m bench.dialects_bench --quick    # a few seconds, for development

Results go to ``bench/results/dialects.md`` (and ``.json``). Each figure is the best of
5 repeats (the least disturbed by the other processes on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from bench.fake_upstream import _shape, stream_events, whole_reply
from nextstate.proxy.capture import add_capture, strip_response
from nextstate.proxy.dialects import anthropic, responses
from nextstate.proxy.dialects.anthropic_stream import MessagesStream
from nextstate.proxy.dialects.conversation import expand
from nextstate.proxy.dialects.responses_stream import ResponsesStream

RESULTS = Path(__file__).parent / "results"
SCHEMA = {"type": "object", "properties": {"path": {"type": "string"},
                                           "content": {"type": "string"}}, "required": ["path"]}
SYSTEM = "You are a coding agent. " * 250  # ~6 KB, like a coding agent's system prompt


def messages_request(stream: bool) -> dict[str, Any]:
    turns: list[dict[str, Any]] = [{"role": "user", "content": "Fix the failing test."}]
    for i in range(11):
        turns.append({"role": "assistant", "content": [
            {"type": "text", "text": f"Reading file {i}."},
            {"type": "tool_use", "id": f"toolu_{i}", "name": "read",
             "input": {"path": f"src/m{i}.py"}}]})
        turns.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": f"toolu_{i}",
             "content": [{"type": "text", "text": "def f():\n    return 1\n" * 20}]}]})
    turns.append({"role": "user", "content": "Go on."})
    return {"model": "toy", "max_tokens": 32, "stream": stream, "system": [
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2; cch=abc"},
        {"type": "text", "text": SYSTEM}], "messages": turns,
        "tools": [{"name": n, "description": f"The {n} tool", "input_schema": SCHEMA}
                  for n in ("read", "write", "edit", "bash", "grep", "glob", "ls", "todo")]}


def responses_request(stream: bool) -> dict[str, Any]:
    items: list[dict[str, Any]] = [{"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "Fix the failing test."}]}]
    for i in range(11):
        items.append({"type": "function_call", "call_id": f"call_{i}", "name": "shell",
                      "arguments": json.dumps({"command": ["cat", f"src/m{i}.py"]})})
        items.append({"type": "function_call_output", "call_id": f"call_{i}",
                      "output": "def f():\n    return 1\n" * 20})
    items.append({"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "Go on."}]})
    return {"model": "toy", "max_output_tokens": 32, "stream": stream, "instructions": SYSTEM,
            "input": items, "store": False,
            "tools": [{"type": "function", "name": n, "description": f"The {n} tool",
                       "parameters": SCHEMA, "strict": False}
                      for n in ("shell", "apply", "read", "write", "grep", "glob", "ls", "plan")]}


def cpu_us(work: Callable[[], Any], number: int, repeats: int = 5) -> float:
    """Best of ``repeats``: CPU microseconds per call of ``work``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(number):
            work()
        best = min(best, time.process_time() - start)
    return best / number * 1e6


def chat_relay_request(raw: bytes, answer: bytes) -> Callable[[], Any]:
    """The chat relay's own JSON work for a request and its whole answer."""
    def work() -> Any:
        body = orjson.loads(raw)
        asked = add_capture(body, "chat")
        orjson.dumps(body)
        return orjson.dumps(strip_response(orjson.loads(answer), asked, "chat"))
    return work


def chat_relay_chunk(payloads: list[bytes]) -> Callable[[], Any]:
    def work() -> Any:
        asked = add_capture({"stream": True}, "chat")
        for payload in payloads:
            b"data: " + orjson.dumps(strip_response(orjson.loads(payload), asked, "chat"))
    return work


SERVED = responses.Served(max_model_len=4096)


def translate(name: str, body: dict[str, Any]) -> dict[str, Any]:
    if name == "messages":
        return anthropic.to_chat(body)
    return responses.to_chat(expand(body, lambda _: None))


def back(name: str, answer: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    if name == "messages":
        return anthropic.from_chat(answer)
    return responses.from_chat(answer, body, SERVED)


def measure_dialect(name: str, number: int) -> dict[str, Any]:
    whole = messages_request(False) if name == "messages" else responses_request(False)
    raw = orjson.dumps(whole)
    chat = translate(name, whole)
    add_capture(chat, "chat")
    answer = whole_reply(_shape("/v1/chat/completions", chat))
    answer_raw = orjson.dumps(answer)
    chunks = stream_events(_shape("/v1/chat/completions", {
        **chat, "stream": True, "stream_options": {"include_usage": True}}))
    payloads = [orjson.dumps(c) for c in chunks]

    def dialect_request() -> Any:
        body = orjson.loads(raw)
        upstream = translate(name, body)
        add_capture(upstream, "chat")
        orjson.dumps(upstream)
        return orjson.dumps(back(name, orjson.loads(answer_raw), body))

    def dialect_chunks() -> Any:
        translator: Any = MessagesStream() if name == "messages" \
            else ResponsesStream({**whole, "stream": True}, SERVED)
        for payload in payloads:
            translator.feed(orjson.loads(payload))
        return translator.done()

    chat_request = cpu_us(chat_relay_request(orjson.dumps(chat), answer_raw), number)
    dialect = cpu_us(dialect_request, number)
    chat_chunk = cpu_us(chat_relay_chunk(payloads), number) / len(payloads)
    dialect_chunk = cpu_us(dialect_chunks, number) / len(payloads)
    return {"dialect": name, "request_bytes": len(raw), "chunks": len(payloads),
            "chat_request_us": chat_request, "dialect_request_us": dialect,
            "to_chat_us": cpu_us(lambda: translate(name, whole), number),
            "from_chat_us": cpu_us(lambda: back(name, answer, whole), number),
            "request_ratio": dialect / chat_request,
            "chat_chunk_us": chat_chunk, "dialect_chunk_us": dialect_chunk,
            "chunk_ratio": dialect_chunk / chat_chunk}


def measure(quick: bool) -> list[dict[str, Any]]:
    number = 20 if quick else 300
    return [measure_dialect(name, number) for name in ("messages", "responses")]


def report(rows: list[dict[str, Any]]) -> str:
    lines = ["| dialect | request | JSON work a request: chat | dialect | ratio "
             "| of which to_chat, from_chat | a streamed chunk: chat | dialect | ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['dialect']} | {r['request_bytes'] / 1024:.0f} KiB | "
            f"{r['chat_request_us']:.0f} µs | {r['dialect_request_us']:.0f} µs | "
            f"{r['request_ratio']:.2f} | {r['to_chat_us']:.0f} µs, {r['from_chat_us']:.0f} µs | "
            f"{r['chat_chunk_us']:.1f} µs | {r['dialect_chunk_us']:.1f} µs | "
            f"{r['chunk_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = measure(args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dialects.json").write_text(json.dumps(rows, indent=1))
    table = report(rows)
    (args.out / "dialects.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
