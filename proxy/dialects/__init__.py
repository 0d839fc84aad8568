"""Dialects: the Anthropic Messages and OpenAI Responses APIs, spoken over chat completions.

agent ─(Messages | Responses)─> proxy ─(chat completions)─> vLLM, and back. Coding agents
speak these two dialects (Claude Code: Messages; Codex CLI: Responses), and vLLM serves
both itself, but returns no token ids on either for the models nextstate serves. Chat
completions does (``return_token_ids``, sampled logprobs), so the proxy translates each
dialect's request into a chat request, lets the relay capture that exchange exactly as it
captures chat, and translates the answer back: the same split LiteLLM and NeMo Gym make.

The criterion is the client's view: at temperature 0 a request answered through the
translation looks exactly like vLLM's own ``/v1/messages`` or ``/v1/responses`` answer,
ids and timestamps aside. So each translator follows vLLM's own conversion wherever vLLM
decides something (how system prompts merge, how tool results become tool messages, how
finish reasons become stop reasons, which events a stream carries, which fields a
response echoes): ``anthropic.py`` mirrors vLLM's ``entrypoints/anthropic/serving.py``,
``responses.py`` and ``responses_stream.py`` mirror ``entrypoints/openai/responses``
(its non-Harmony path). ``conversation.py`` expands Responses' ``previous_response_id``.

Every function here is pure: JSON-shaped dicts in, dicts or SSE bytes out, no I/O, no
state beyond one stream's translator object. Bad input raises `InvalidRequest` (the
caller renders it in the dialect's error shape); an error vLLM answers on the chat route
is reshaped by each module's ``error_from_chat``.
"""

from __future__ import annotations

from typing import Any

import orjson

JSON = dict[str, Any]


def sse(event: str | None, data: JSON) -> bytes:
    """One server-sent event: ``event: NAME`` (both dialects name their events) + data."""
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


def chat_error(body: bytes) -> JSON:
    """The ``error`` object of an error vLLM answered on the chat route (OpenAI shape),
    or a generic one when the body is not that shape."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict):
        return error
    text = body.decode("utf-8", "replace")[:2000]
    return {"message": text or "the model backend failed", "type": "api_error",
            "param": None, "code": None}
