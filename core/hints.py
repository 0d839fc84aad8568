"""Where a hint goes in a prompt: the one placement the teacher and the proxy share
(learner -> teacher -> vLLM; proxy -> vLLM with lessons).

The learner's teacher scores a turn "as if the user had said" a hint: the hint is
appended to the last user message after `HINT_MARKER` (a completions prompt gets it at
its end). The proxy's memory serves lessons, hints remembered from earlier turns, in
exactly that place and form (several lessons are one hint, a line each), so the context a
request is served with IS the teacher's context, and a turn served with lessons can be
distilled: the student learns from the prompt without them, the teacher scores it with
them (`nextstate.learner.teacher`).

Nothing here copies more than it changes: the request path calls it too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

HINT_MARKER = "\n\n[user's hint / instruction]\n"


def joined(texts: Iterable[str | None]) -> str | None:
    """Several hints (lessons, then a judge's hint) as one hint: a line each; None when
    there is none."""
    parts = [t.strip() for t in texts if t and t.strip()]
    return "\n".join(parts) if parts else None


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a hint was put: the message (its index in the messages the model saw; for a
    completions prompt, -1), the content part when the content is a list (else None), and
    the character offset of `HINT_MARKER` in that text. ``added`` counts the messages
    added (1 when there was no user message to append to)."""

    message: int
    part: int | None
    offset: int
    added: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"message": self.message, "part": self.part, "offset": self.offset,
                "added": self.added}


def place_hint(messages: Sequence[dict[str, Any]], hint: str
               ) -> tuple[list[dict[str, Any]], Placement]:
    """The messages with ``hint`` appended to the last user message (or added as one),
    and where it went. Only the changed message is copied; the others are shared."""
    out = list(messages)
    for index in range(len(out) - 1, -1, -1):
        message = out[index]
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, list):
            out[index] = {**message, "content": [
                *content, {"type": "text", "text": HINT_MARKER + hint}]}
            return out, Placement(index, len(content), 0)
        text = content if isinstance(content, str) else ""
        out[index] = {**message, "content": f"{text}{HINT_MARKER}{hint}"}
        return out, Placement(index, None, len(text))
    out.append({"role": "user", "content": HINT_MARKER.lstrip("\n") + hint})
    return out, Placement(len(out) - 1, None, 0, added=1)


def with_hint(messages: Sequence[dict[str, Any]], hint: str) -> list[dict[str, Any]]:
    """The messages with ``hint`` appended to the last user message (or added as one)."""
    return place_hint(messages, hint)[0]


def prompt_with_hint(prompt: str, hint: str) -> str:
    """A completions prompt with ``hint`` at its end."""
    return f"{prompt}{HINT_MARKER}{hint}"
