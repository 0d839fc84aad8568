"""Next states in a dialect's own terms (proxy -> store -> judges).

A dialect turn is recorded as the chat exchange the model saw, so its next state is the
chat messages that follow the previous reply (`sessions.next_state_of`): ``tool``
messages for Responses ``function_call_output`` items and Anthropic ``tool_result``
blocks, ``user`` messages for user text. One thing the translation drops, because the
model never sees it, matters to a judge: Anthropic's ``is_error`` on a tool result.
`tool_errors` puts it back, as ``"status": "error"`` on the tool message (what the rules
judge reads as a failed tool call).
"""

from __future__ import annotations

from typing import Any

JSON = dict[str, Any]


def tool_errors(state: list[JSON], dialect: JSON | None) -> list[JSON]:
    """``state`` with each tool result the client marked ``is_error`` flagged as such."""
    failed = _failed_calls(dialect)
    if not failed:
        return state
    return [{**m, "status": "error"} if m.get("role") == "tool"
            and m.get("tool_call_id") in failed else m for m in state]


def _failed_calls(dialect: JSON | None) -> set[str]:
    request = (dialect or {}).get("request")
    messages = request.get("messages") if isinstance(request, dict) else None
    if not isinstance(messages, list):
        return set()
    failed: set[str] = set()
    for message in reversed(messages):  # the tool results after the last reply
        if not isinstance(message, dict) or message.get("role") == "assistant":
            break
        content = message.get("content")
        for block in content if isinstance(content, list) else []:
            if isinstance(block, dict) and block.get("type") == "tool_result" \
                    and block.get("is_error") is True:
                failed.add(str(block.get("tool_use_id") or ""))
    return failed
