"""Responses conversations: ``previous_response_id`` expanded into the whole conversation.

agent ─(POST /v1/responses, previous_response_id=R)─> proxy ─(chat)─> vLLM. A Responses
client may send only what is new and name the response it continues; the model must
still see everything before it, and nextstate must record (and pair) exactly what the
model saw. So the proxy resolves the chain itself, before translating, from responses it
served and kept: vLLM is never asked (by default it keeps nothing, and answers 404).

The design (storage is the relay's and the store's part; this module is the pure part):

- **What is kept.** For every response served with ``store`` not false, the proxy keeps
  a `Kept`: the response's *expanded* input (every item the model saw, instructions
  aside), its output items verbatim, and the whole Responses object the client got.
  Keyed by the response id, scoped to the tenant. In the store this is the turn itself:
  a turn recorded from ``/v1/responses`` carries its dialect request (already expanded)
  and its dialect response, so no second table is needed; a lookup by response id is an
  index on that column.
- **Expansion.** ``input`` becomes ``kept.input + kept.output + own input``: one lookup,
  because what was kept is itself expanded. Instructions are not carried over (OpenAI's
  rule: each request's ``instructions`` apply to it alone). Output items go back in as
  they were served (function_call items keep their call ids and argument strings), so
  the next prompt extends the previous prompt plus its completion token for token, and
  session matching pairs the turns with no header.
- **Answers.** An unknown id (or another tenant's, or one served with ``store: false``)
  is a 404 in OpenAI's shape, as OpenAI and vLLM give it. ``GET /v1/responses/{id}``
  returns the kept object; ``DELETE`` forgets it (and ``forget`` erases it with the turn).
- **store: false** serves the request normally, records the turn as usual (recording is
  nextstate's contract with the operator, not the client's storage request), and keeps
  nothing retrievable by id.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nextstate.proxy.dialects import JSON
from nextstate.proxy.errors import InvalidRequest, NotFound


@dataclass(frozen=True)
class Kept:
    """A served response, as the proxy keeps it for ``previous_response_id``."""

    input: list[JSON]  # every item the model saw, expanded, instructions aside
    output: list[JSON]  # the response's output items, as served
    response: JSON  # the Responses object the client got


Lookup = Callable[[str], Kept | None]


def input_items(value: Any) -> list[JSON]:
    """A request's ``input`` as a list of items (a string is one user message)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if isinstance(value, list):
        return list(value)
    raise InvalidRequest("input: a string or a list of input items is required",
                         param="input")


def expand(body: JSON, lookup: Lookup) -> JSON:
    """``body`` with ``input`` holding the whole conversation the model will see.
    Without ``previous_response_id`` it is ``body`` itself; ``previous_response_id``
    stays in the result (the response echoes it)."""
    previous = body.get("previous_response_id")
    if previous is None:
        return body
    if not isinstance(previous, str) or not previous:
        raise InvalidRequest("previous_response_id: a response id", param="previous_response_id")
    kept = lookup(previous)
    if kept is None:
        raise NotFound(f"Response with id '{previous}' not found.",
                       param="previous_response_id")
    return {**body, "input": [*kept.input, *kept.output, *input_items(body.get("input"))]}


def keep(expanded: JSON, response: JSON) -> Kept:
    """What to keep of a served response, given the expanded request it answered."""
    return Kept(input=input_items(expanded.get("input")),
                output=list(response.get("output") or []), response=response)
