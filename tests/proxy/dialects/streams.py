"""Chat chunks as vLLM streams them, for feeding the dialect stream translators."""

from __future__ import annotations

from typing import Any

import orjson


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None,
          stop_reason: Any = None, usage: dict[str, Any] | None = None,
          **extra: Any) -> dict[str, Any]:
    """One chat chunk; ``delta=None`` makes the usage chunk (no choices)."""
    out: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk",
                           "created": 1700000000, "model": "toy", **extra}
    if delta is None:
        out["choices"] = []
    else:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                                  "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = stop_reason
        out["choices"] = [choice]
    if usage is not None:
        out["usage"] = usage
    return out


def role() -> dict[str, Any]:
    return chunk({"role": "assistant", "content": ""},
                 usage={"prompt_tokens": 7, "completion_tokens": 0, "total_tokens": 7})


def text(piece: str) -> dict[str, Any]:
    return chunk({"content": piece})


def call(index: int, call_id: str | None = None, name: str | None = None,
         arguments: str | None = None) -> dict[str, Any]:
    function: dict[str, Any] = {}
    if name is not None:
        function["name"] = name
    if arguments is not None:
        function["arguments"] = arguments
    tool: dict[str, Any] = {"index": index, "function": function}
    if call_id is not None:
        tool.update(id=call_id, type="function")
    return chunk({"content": None, "tool_calls": [tool]})


def end(finish: str, stop_reason: Any = None, completion: int = 5) -> list[dict[str, Any]]:
    """The finish chunk and the usage chunk."""
    return [chunk({}, finish=finish, stop_reason=stop_reason),
            chunk(None, usage={"prompt_tokens": 7, "completion_tokens": completion,
                               "total_tokens": 7 + completion})]


def sse_events(raw: bytes) -> list[tuple[str | None, dict[str, Any]]]:
    """SSE bytes as (event name, data) pairs."""
    out = []
    for block in raw.split(b"\n\n"):
        name, data = None, None
        for line in block.splitlines():
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data = orjson.loads(line[6:])
        if data is not None:
            out.append((name, data))
    return out
