"""A streamed Anthropic Messages answer, made from chat chunks as they arrive.

agent <─(Messages events)─ proxy <─(chat chunks)─ vLLM. `MessagesStream` takes one chat
chunk at a time and returns its Anthropic events as SSE bytes, as vLLM 0.32's
``entrypoints/anthropic/serving.py`` streams them: ``message_start`` on the first chunk,
then content blocks (thinking, text, tool_use: ``content_block_start``, deltas,
``content_block_stop``), ``message_delta`` with the stop reason and usage at the usage
chunk, ``message_stop`` at ``[DONE]``. No ``ping`` events (vLLM sends none); text the
model writes while a tool call is open is held and sent as its own text block once the
tool block closes.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from nextstate.proxy.dialects import JSON, sse
from nextstate.proxy.dialects.anthropic import stop_reason, usage


class MessagesStream:
    """One streamed answer: chat chunks in (`feed`, then `done` at ``[DONE]``), Anthropic
    events out as SSE bytes, each as soon as the chunk that makes it arrives."""

    def __init__(self) -> None:
        self.started = False
        self.next_index = 0  # index of the next content block
        self.block: str | None = None  # type of the open block
        self.tool_id: str | None = None  # id of the open tool_use block
        self.pending: list[str] = []  # text that arrived while a tool block was open
        self.finish: str | None = None
        self.matched: Any = None  # the stop string that matched, if one did
        self.tool_used = False
        self.tool_args: list[str] = []  # arguments of the latest tool call
        self.tool_ids: dict[int, str] = {}
        self.failed = False  # after an error event the stream ends: nothing more is sent

    def feed(self, chunk: JSON) -> bytes:
        if self.failed:
            return b""
        if "error" in chunk and "choices" not in chunk:
            return self.fail(chunk["error"])
        if not self.started:
            self.started = True
            return sse("message_start", {"type": "message_start", "message": {
                "id": chunk.get("id"), "type": "message", "role": "assistant", "content": [],
                "model": chunk.get("model"), "stop_reason": None, "stop_sequence": None,
                "usage": usage(chunk.get("usage"))}})
        choices = chunk.get("choices") or []
        if not choices:  # the usage chunk: the message ends
            out = self._stop_and_flush()
            reason, sequence = stop_reason(
                self.finish or "stop", self.matched, self.tool_used,
                self.tool_used and _is_json("".join(self.tool_args)))
            out.append(sse("message_delta", {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": sequence},
                "usage": usage(chunk.get("usage"))}))
            return b"".join(out)
        choice = choices[0]
        if choice.get("finish_reason") is not None:
            self.finish, self.matched = choice["finish_reason"], choice.get("stop_reason")
        delta = choice.get("delta") or {}
        out = []
        if delta.get("reasoning"):
            if self.block != "thinking":
                out += self._stop_and_flush()
                out.append(self._start({"type": "thinking", "thinking": ""}))
            out.append(self._delta({"type": "thinking_delta", "thinking": delta["reasoning"]}))
        if delta.get("content"):
            if self.block == "tool_use":
                self.pending.append(delta["content"])
            else:
                if self.block != "text":
                    out += self._stop_and_flush()
                    out.append(self._start({"type": "text", "text": ""}))
                out.append(self._delta({"type": "text_delta", "text": delta["content"]}))
        for call in delta.get("tool_calls") or []:
            out += self._tool_call(call)
        return b"".join(out)

    def _tool_call(self, call: JSON) -> list[bytes]:
        function = call.get("function") or {}
        out = []
        if call.get("id") is not None:
            self.tool_ids[call.get("index", 0)] = call["id"]
            if self.tool_id != call["id"] and function.get("name") is not None:
                out += self._stop_and_flush()
                self.tool_used, self.tool_args = True, []
                out.append(self._start({"type": "tool_use", "id": call["id"],
                                        "name": function["name"], "input": {}}))
            tool_id = call["id"]
        else:
            tool_id = self.tool_ids.get(call.get("index", 0))
        if tool_id is not None and function.get("arguments") and self.tool_id == tool_id:
            self.tool_args.append(function["arguments"])
            out.append(self._delta({"type": "input_json_delta",
                                    "partial_json": function["arguments"]}))
        return out

    def done(self) -> bytes:
        """At the chat stream's ``[DONE]``."""
        if self.failed:
            return b""
        return b"".join(self._stop_and_flush()) + sse("message_stop", {"type": "message_stop"})

    def fail(self, error: Any) -> bytes:
        """An error in the stream (vLLM's error chunk, or the backend lost)."""
        message = error.get("message") if isinstance(error, dict) else str(error)
        self.failed = True
        return sse("error", {"type": "error", "error": {"type": "internal_error",
                                                        "message": str(message)}})

    def _start(self, block: JSON) -> bytes:
        self.block = block["type"]
        self.tool_id = block.get("id")
        return sse("content_block_start", {"type": "content_block_start",
                                           "content_block": block, "index": self.next_index})

    def _delta(self, delta: JSON) -> bytes:
        return sse("content_block_delta", {"type": "content_block_delta", "delta": delta,
                                           "index": self.next_index})

    def _stop(self) -> list[bytes]:
        if self.block is None:
            return []
        out = []
        if self.block == "thinking":
            out.append(self._delta({"type": "signature_delta", "signature": uuid.uuid4().hex}))
        out.append(sse("content_block_stop", {"type": "content_block_stop",
                                              "index": self.next_index}))
        self.block, self.tool_id = None, None
        self.next_index += 1
        return out

    def _stop_and_flush(self) -> list[bytes]:
        held, self.pending = "".join(self.pending), []
        out = self._stop()
        if held:
            out.append(self._start({"type": "text", "text": ""}))
            out.append(self._delta({"type": "text_delta", "text": held}))
            out += self._stop()
        return out


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True
