"""The relay's dialect views: a chat exchange shown to the client as Messages or Responses.

agent <─(Messages | Responses)─ **view** <─(chat, as the client would see it)─ relay <─ vLLM.
The relay (proxy/relay.py) carries and records a chat exchange exactly as it carries
chat; a `relay.View` makes the bytes the client gets: the whole answer translated at
once, a stream one chat event at a time (each dialect event goes out with the chunk that
makes it), errors in the dialect's shape. Before the relay commits the record it asks
the view for what the record keeps of the dialect (`kept`): the client's request and the
answer it got. A Responses view also keeps the answer for ``previous_response_id``
(kept.py) as soon as it is made, before the client has it.
"""

from __future__ import annotations

from typing import Any

import orjson

from nextstate.core.records import Recorded
from nextstate.proxy.dialects import JSON, anthropic, responses
from nextstate.proxy.dialects.anthropic_stream import MessagesStream
from nextstate.proxy.dialects.conversation import keep
from nextstate.proxy.dialects.kept import KeptResponses
from nextstate.proxy.dialects.responses_stream import ResponsesStream
from nextstate.proxy.errors import BackendUnavailable, ProxyError, Shape


def chat_events(data: bytes) -> list[JSON | None]:
    """Complete SSE events as chat chunks; None for ``[DONE]`` (other events skipped)."""
    out: list[JSON | None] = []
    for event in data.split(b"\n\n"):
        if not event.startswith(b"data:"):
            continue
        payload = event[5:].strip()
        if payload == b"[DONE]":
            out.append(None)
            continue
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            chunk = {"error": {"message": "the model backend sent an unreadable event"}}
        out.append(chunk if isinstance(chunk, dict) else {"error": {"message": str(chunk)}})
    return out


def _chat_answer(raw: bytes) -> JSON | None:
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return answer if isinstance(answer, dict) and answer.get("choices") else None


class MessagesView:
    """Anthropic Messages over the chat exchange."""

    endpoint: Recorded = "messages"
    shape: Shape = "anthropic"

    def __init__(self, body: JSON) -> None:
        self.body = body
        self.stream = MessagesStream()
        self.answer: JSON | None = None

    def whole(self, status: int, raw: bytes) -> tuple[int, bytes]:
        if status != 200:
            return status, anthropic.error_from_chat(status, raw)
        chat = _chat_answer(raw)
        if chat is None:
            error = BackendUnavailable("The model backend answered something that is not a "
                                       "chat completion.")
            return error.status, error.body(self.shape)
        try:
            self.answer = anthropic.from_chat(chat)
        except ProxyError as exc:
            return exc.status, exc.body(self.shape)
        return 200, orjson.dumps(self.answer)

    def events(self, data: bytes) -> bytes:
        return b"".join(self.stream.done() if chunk is None else self.stream.feed(chunk)
                        for chunk in chat_events(data))

    def lost(self, error: ProxyError) -> bytes:
        return self.stream.fail({"message": error.message})

    def kept(self) -> dict[str, Any] | None:
        return {"request": self.body, "response": self.answer, "store": False}


class ResponsesView:
    """OpenAI Responses over the chat exchange; ``body`` is the expanded request."""

    endpoint: Recorded = "responses"
    shape: Shape = "openai"

    def __init__(self, body: JSON, served: responses.Served, kept: KeptResponses,
                 tenant: str | None) -> None:
        self.body = body
        self.served = served
        self.keeper = kept
        self.tenant = tenant
        self.store = body.get("store") is not False
        self.stream = ResponsesStream(body, served)
        self.answer: JSON | None = None

    def whole(self, status: int, raw: bytes) -> tuple[int, bytes]:
        if status != 200:  # vLLM's own Responses errors have the chat route's shape
            return status, raw
        chat = _chat_answer(raw)
        if chat is None:
            error = BackendUnavailable("The model backend answered something that is not a "
                                       "chat completion.")
            return error.status, error.body(self.shape)
        self._answered(responses.from_chat(chat, self.body, self.served,
                                           response_id=self.stream.response_id))
        return 200, orjson.dumps(self.answer)

    def events(self, data: bytes) -> bytes:
        out = []
        for chunk in chat_events(data):
            if chunk is not None:
                out.append(self.stream.feed(chunk))
                continue
            out.append(self.stream.done())
            if self.stream.final is not None:
                self._answered(self.stream.final)
        return b"".join(out)

    def lost(self, error: ProxyError) -> bytes:
        return self.stream.fail({"message": error.message, "code": error.type})

    def kept(self) -> dict[str, Any] | None:
        return {"request": self.body, "response": self.answer, "store": self.store}

    def _answered(self, answer: JSON) -> None:
        self.answer = answer
        if self.store:
            self.keeper.put(self.tenant, keep(self.body, answer))
