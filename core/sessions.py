"""Sessions and next states, as pure functions over OpenAI messages.

agent -> proxy: a turn's session comes from ``X-Session-Id`` (or OpenClaw's
``x-openclaw-session-key``, `SESSION_HEADERS`; or ``session_id`` in the body), else from the
conversation itself: a request whose messages extend an earlier turn's messages plus its
reply continues that turn's session. The store applies these
functions off the request path (proxy -> store), so the request path only reads headers.

A *continuation key* is a hash of a normalised conversation. Normalisation keeps what a
client reliably echoes back (roles, text, tool calls with canonical JSON arguments) and
drops what clients rewrite (null fields, ids, spacing inside tool arguments).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

TurnType = Literal["main", "side"]

SESSION_HEADER = "x-session-id"
# Headers that name the session, in this order of precedence: nextstate's own, then
# OpenClaw's gateway's (it routes sessions by it). The coding agents' own session headers
# (x-claude-code-session-id, Codex's session-id, OpenCode's x-session-affinity) are not
# read: they ride on the agent's background calls (titles, summaries, compaction) too, and
# a session id pairs a turn with the session's last one whatever it asks, so those calls
# would become next states. Conversation matching pairs those agents' turns without them.
SESSION_HEADERS = (SESSION_HEADER, "x-openclaw-session-key")
TURN_TYPE_HEADER = "x-turn-type"
SESSION_DONE_HEADER = "x-session-done"
RECORD_HEADER = "x-nextstate-record"
FEEDBACK_HEADER = "x-nextstate-feedback"
HINT_HEADER = "x-nextstate-hint"
FEEDBACK_FOR_HEADER = "x-nextstate-feedback-for"
USER_HEADER = "x-nextstate-user"  # whose turn this is (for personal adapters)
MEMORY_HEADER = "x-nextstate-memory"  # off: no lessons for this request
MAX_USER_LENGTH = 128
# Body fields with the same meaning as the headers; removed before forwarding.
BODY_FIELDS = ("session_id", "turn_type", "session_done")

_TRUE = {"1", "true", "yes", "on"}
_OFF = {"off", "0", "false", "no"}


@dataclass(frozen=True, slots=True)
class SessionMeta:
    """What a request says about its session; everything is optional."""

    session_id: str | None = None
    turn_type: TurnType = "main"
    done: bool = False
    record: bool = True
    # Opt-in feedback about the previous turn (or the turn named by Feedback-For).
    feedback: dict[str, Any] | None = None
    user: str | None = None  # X-NextState-User, as sent
    memory: bool = True  # X-NextState-Memory: off keeps lessons out of this request


def owner(user: str | None, tenant: str | None) -> str | None:
    """Who a turn belongs to: the user the client names, within its API key's tenant
    (``team-a:alice``, so that one tenant can never name another's user), else the
    tenant itself, else nobody."""
    if user and tenant:
        return f"{tenant}:{user}"
    return user or tenant


def parse_score(value: object) -> int:
    """+1, 0 or -1 from a header or JSON value; ValueError for anything else."""
    if isinstance(value, bool):
        raise ValueError("a score is +1, 0 or -1, not a boolean")
    if isinstance(value, int | float) and value in (1, 0, -1):
        return int(value)
    if isinstance(value, str) and value.strip() in ("+1", "1", "0", "-1", "-0", "+0"):
        return int(value.strip())
    raise ValueError(f"a score is +1, 0 or -1, got {value!r}")


def read_session_meta(headers: Mapping[str, str], body: dict[str, Any]) -> SessionMeta:
    """Session fields from headers (which win) or the body; pops the body fields.
    Raises ValueError for a malformed feedback header."""
    from_body = {k: body.pop(k) for k in BODY_FIELDS if k in body}
    session_id = next((headers[h] for h in SESSION_HEADERS if headers.get(h)),
                      None) or from_body.get("session_id")
    turn_type = (headers.get(TURN_TYPE_HEADER) or str(from_body.get("turn_type") or "main"))
    done = headers.get(SESSION_DONE_HEADER)
    done_flag = _truthy(done) if done is not None else _truthy(from_body.get("session_done"))
    record = headers.get(RECORD_HEADER, "on").strip().lower() not in _OFF
    memory = headers.get(MEMORY_HEADER, "on").strip().lower() not in _OFF
    feedback = None
    if FEEDBACK_HEADER in headers:
        feedback = {"score": parse_score(headers[FEEDBACK_HEADER]),
                    "hint": headers.get(HINT_HEADER) or None,
                    "turn_id": headers.get(FEEDBACK_FOR_HEADER) or None}
    elif HINT_HEADER in headers:
        raise ValueError(f"{HINT_HEADER} needs {FEEDBACK_HEADER} (+1, 0 or -1) beside it")
    user = headers.get(USER_HEADER, "").strip() or None
    if user is not None and len(user) > MAX_USER_LENGTH:
        raise ValueError(f"{USER_HEADER} is at most {MAX_USER_LENGTH} characters")
    return SessionMeta(
        session_id=str(session_id) if session_id else None,
        turn_type="side" if turn_type.strip().lower() == "side" else "main",
        done=done_flag,
        record=record,
        feedback=feedback,
        user=user,
        memory=memory,
    )


def _truthy(value: object) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in _TRUE


def text_of(content: Any) -> str:
    """Text of a message content: a string, None, or a list of typed parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                parts.append(str(part.get("text", f"<{part.get('type', 'part')}>")))
            else:
                parts.append(str(part))
        return "".join(parts)
    return str(content)


def image_urls(messages: Sequence[Any]) -> list[str]:
    """The URLs of the chat ``image_url`` parts in ``messages``, in order: ``data:`` URLs,
    remote ``http(s)`` ones, or the store's ``nextstate-image:`` references."""
    urls = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                if isinstance(url, str) and url:
                    urls.append(url)
    return urls


def only_images(messages: Sequence[Any]) -> bool:
    """Do ``messages`` carry images and no text at all (a bare screenshot)?"""
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        parts = content if isinstance(content, list) else [{"text": content}]
        if any(isinstance(p, dict) and isinstance(p.get("text"), str) and p["text"].strip()
               for p in parts) or message.get("tool_calls"):
            return False
    return bool(image_urls(messages))


def _canonical_arguments(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return orjson.loads(arguments)
        except orjson.JSONDecodeError:
            return arguments
    return arguments


def normalise(message: Any) -> list[Any]:
    if not isinstance(message, dict):  # garbage in a request vLLM will refuse anyway
        return [None, text_of(message), []]
    calls = []
    tool_calls = message.get("tool_calls")
    for call in tool_calls if isinstance(tool_calls, list) else []:
        fn = (call.get("function") or {}) if isinstance(call, dict) else {}
        calls.append([fn.get("name"), _canonical_arguments(fn.get("arguments"))])
    return [message.get("role"), text_of(message.get("content")), calls]


def conversation_key(messages: Sequence[Any]) -> str:
    """A stable hash of a conversation, insensitive to what clients rewrite."""
    payload = orjson.dumps([normalise(m) for m in messages], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(payload).hexdigest()[:40]


def last_assistant_index(messages: Sequence[Any]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if isinstance(messages[i], dict) and messages[i].get("role") == "assistant":
            return i
    return None


def next_state_of(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """What followed the previous assistant reply: user answers, tool results.

    A client that does not resend history (explicit session id, no assistant message)
    gets its non-system messages taken as the next state.
    """
    proper = [m for m in messages if isinstance(m, dict)]
    i = last_assistant_index(proper)
    tail = proper[i + 1 :] if i is not None else [
        m for m in proper if m.get("role") not in ("system", "developer")
    ]
    return [dict(m) for m in tail]


def next_state_kind(next_state: Sequence[Mapping[str, Any]]) -> str:
    """``tool`` when the reply was followed by tool results, else ``user``."""
    if next_state and next_state[0].get("role") == "tool":
        return "tool"
    return "user"
