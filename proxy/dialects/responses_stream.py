"""A streamed Responses answer, made from chat chunks as they arrive.

agent <─(Responses events)─ proxy <─(chat chunks)─ vLLM. `ResponsesStream` takes one chat
chunk at a time and returns the events it makes, as SSE bytes: ``response.created`` and
``response.in_progress`` on the first chunk; then, per output item, ``output_item.added``
(+ ``content_part.added`` for text and reasoning), its deltas, and its ``.done`` events
when the next item starts or the answer ends; ``response.completed`` last, carrying the
items as streamed. Every event has the next ``sequence_number``. This is vLLM 0.32's
``SimpleStreamingEventProcessor`` (``entrypoints/openai/responses/streaming_events.py``)
fed with chat deltas instead of parser deltas: a delta goes to the tool call when it has
one, else to reasoning, else to text; a new tool call index opens a new item.

Nothing is held back but text the model writes while a tool call is open: it goes out
as its own message item once the call's item closes (as the Anthropic stream does; vLLM's
processor would reopen a nameless call when the arguments go on after such text, and
fail). Otherwise each chunk's events go out with it. The only state is the open item
(its id, text so far, logprobs so far) and what the final object needs (items, finish
reason, usage).
"""

from __future__ import annotations

from typing import Any

from nextstate.proxy.dialects import JSON, sse
from nextstate.proxy.dialects.responses import (
    LOGPROBS,
    Served,
    call_item,
    finished,
    frame,
    logprob,
    message_item,
    new_id,
    reasoning_item,
    text_part,
)


class ResponsesStream:
    """One streamed Responses answer for ``body`` (as `responses.to_chat` translated it)."""

    def __init__(self, body: JSON, served: Served, *, response_id: str | None = None) -> None:
        self.body = body
        self.served = served
        self.response_id = response_id or body.get("request_id") or new_id("resp")
        self.logprobs = LOGPROBS in (body.get("include") or []) \
            and body.get("include_reasoning") is not False
        self.response: JSON | None = None  # the frame, once the first chunk told the model
        self.sequence = 0
        self.state: str | None = None  # "text", "reasoning", "tool" or None
        self.index = 0  # output_index of the open (or next) item
        self.item_id = ""
        self.text = ""  # text, reasoning or arguments of the open item so far
        self.kept_logprobs: list[JSON] = []
        self.call: JSON = {}  # the open tool call: call_id, name, index
        self.items: list[JSON] = []
        self.held: list[tuple[str, Any]] = []  # text that came while a tool call was open
        self.finish: str | None = None
        self.usage: JSON | None = None
        self.failed = False
        self.final: JSON | None = None  # the completed object (to keep, for previous_response_id)

    def feed(self, chunk: JSON) -> bytes:
        if self.failed:
            return b""
        if "error" in chunk and "choices" not in chunk:
            return self.fail(chunk["error"])
        out = [] if self.response is not None else self._start(chunk)
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            if choice.get("finish_reason") is not None:
                self.finish = choice["finish_reason"]
            delta = choice.get("delta") or {}
            for part in _split(delta):
                out += self._route(part, choice.get("logprobs"))
        return b"".join(out)

    def done(self) -> bytes:
        """At the chat stream's ``[DONE]``: close the open item, then complete."""
        if self.failed:
            return b""
        out = [] if self.response is not None else self._start({})
        out += self._close()
        assert self.response is not None
        self.final = finished(self.response, self.items, self.finish, self.usage)
        out.append(self._event("response.completed", {"response": self.final}))
        return b"".join(out)

    def fail(self, error: Any) -> bytes:
        """An error in the stream: an ``error`` event, and nothing after it."""
        self.failed = True
        error = error if isinstance(error, dict) else {"message": str(error)}
        return self._event("error", {"code": error.get("code"), "message":
                                     str(error.get("message")), "param": error.get("param")})

    def _event(self, kind: str, fields: JSON) -> bytes:
        data = {**fields, "sequence_number": self.sequence, "type": kind}
        self.sequence += 1
        return sse(kind, data)

    def _start(self, chunk: JSON) -> list[bytes]:
        ids = chunk.get("prompt_token_ids")
        prompt = len(ids) if isinstance(ids, list) else (chunk.get("usage") or {}).get(
            "prompt_tokens")
        self.response = frame(self.body, response_id=self.response_id,
                              created_at=int(chunk.get("created") or 0),
                              model=chunk.get("model"), prompt_tokens=prompt,
                              served=self.served)
        return [self._event("response.created", {"response": self.response}),
                self._event("response.in_progress", {"response": self.response})]

    def _route(self, delta: JSON, logprobs: Any) -> list[bytes]:
        calls = delta.get("tool_calls") or []
        if calls and calls[0].get("function") is not None:
            target = "tool"
        elif delta.get("reasoning") is not None:
            target = "reasoning"
        elif delta.get("content"):
            target = "text"
        else:
            return []
        if target == "text" and self.state == "tool":  # held until the call's item closes
            self.held.append((delta["content"], logprobs))
            return []
        out = []
        index = calls[0].get("index") if target == "tool" else None
        if self.state != target or (target == "tool" and index is not None
                                    and self.call.get("index") not in (None, index)):
            out += self._close()
            out += self._open(target, calls[0] if calls else {})
        if target == "tool":
            arguments = "".join((c.get("function") or {}).get("arguments") or "" for c in calls)
            if arguments:
                self.text += arguments
                out.append(self._event("response.function_call_arguments.delta", {
                    "delta": arguments, "item_id": self.item_id, "output_index": self.index}))
        elif target == "reasoning":
            self.text += delta["reasoning"]
            out.append(self._event("response.reasoning_text.delta", {
                "content_index": 0, "delta": delta["reasoning"], "item_id": self.item_id,
                "output_index": self.index}))
        else:
            entries = [logprob(e) for e in (logprobs or {}).get("content") or []] \
                if self.logprobs else []
            out += self._text(delta["content"], entries)
        return out

    def _text(self, text: str, entries: list[JSON]) -> list[bytes]:
        self.text += text
        self.kept_logprobs += entries
        return [self._event("response.output_text.delta", {
            "content_index": 0, "delta": text, "item_id": self.item_id,
            "logprobs": [_stream_logprob(e) for e in entries], "output_index": self.index})]

    def _open(self, target: str, call: JSON) -> list[bytes]:
        self.state, self.text, self.kept_logprobs = target, "", []
        if target == "tool":
            self.item_id = new_id("fc")
            self.call = {"call_id": call.get("id") or new_id("call"), "index": call.get("index"),
                         "name": (call.get("function") or {}).get("name") or ""}
            item = call_item(self.item_id, self.call["call_id"], self.call["name"], "",
                             "in_progress")
            return [self._event("response.output_item.added",
                                {"item": item, "output_index": self.index})]
        if target == "reasoning":
            self.item_id = new_id("rs")
            item, part = reasoning_item(self.item_id, None, "in_progress"), {
                "text": "", "type": "reasoning_text"}
        else:
            self.item_id = new_id("msg")
            item, part = message_item(self.item_id, [], "in_progress"), text_part("", [])
        return [self._event("response.output_item.added",
                            {"item": item, "output_index": self.index}),
                self._event("response.content_part.added", {
                    "content_index": 0, "item_id": self.item_id, "output_index": self.index,
                    "part": part})]

    def _close(self) -> list[bytes]:
        if self.state is None:
            return []
        where = {"item_id": self.item_id, "output_index": self.index}
        if self.state == "tool":
            item = call_item(self.item_id, self.call["call_id"], self.call["name"], self.text,
                             "completed")
            out = [self._event("response.function_call_arguments.done", {
                "arguments": self.text, **where, "name": self.call["name"]})]
        elif self.state == "reasoning":
            part = {"text": self.text, "type": "reasoning_text"}
            item = {**reasoning_item(self.item_id, self.text, "completed")}
            out = [self._event("response.reasoning_text.done",
                               {"content_index": 0, **where, "text": self.text}),
                   self._event("response.content_part.done",
                               {"content_index": 0, **where, "part": part})]
        else:
            part = text_part(self.text, self.kept_logprobs or None)
            item = message_item(self.item_id, [part] if self.text else [], "completed")
            out = [self._event("response.output_text.done", {
                       "content_index": 0, **where, "logprobs": [], "text": self.text}),
                   self._event("response.content_part.done",
                               {"content_index": 0, **where, "part": part})]
        out.append(self._event("response.output_item.done",
                               {"item": item, "output_index": self.index}))
        self.items.append(item)
        self.index += 1
        self.state, self.call = None, {}
        if self.held:
            held, self.held = self.held, []
            out += self._open("text", {})
            for text, logprobs in held:
                entries = [logprob(e) for e in (logprobs or {}).get("content") or []] \
                    if self.logprobs else []
                out += self._text(text, entries)
            out += self._close()
        return out


def _split(delta: JSON) -> list[JSON]:
    """A chat delta as one delta per event kind: reasoning, text, then each tool call
    index (vLLM's ``split_delta``)."""
    calls = delta.get("tool_calls") or []
    parts = [k for k in ("reasoning", "content") if delta.get(k) is not None]
    if len(parts) + bool(calls) <= 1 and len({c.get("index") for c in calls}) <= 1:
        return [delta]
    out: list[JSON] = [{k: delta[k]} for k in parts]
    groups: dict[Any, list[JSON]] = {}
    for call in calls:
        groups.setdefault(call.get("index"), []).append(call)
    out += [{"tool_calls": group} for group in groups.values()]
    return out


def _stream_logprob(entry: JSON) -> JSON:
    return {"token": entry["token"], "logprob": entry["logprob"],
            "top_logprobs": [{"token": t["token"], "logprob": t["logprob"]}
                             for t in entry["top_logprobs"]]}
