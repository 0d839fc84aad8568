"""Token capture: what the proxy adds to an upstream request and strips from the reply.

agent -> proxy -> vLLM. To record exact tokens the proxy asks vLLM for
``return_token_ids``, sampled-token ``logprobs`` and (when streaming) the usage chunk,
then hands the client back exactly what it would have got without those options.
vLLM answers ``null`` for token ids and logprobs nobody asked for, so "stripping" means
resetting those keys to ``null``, never deleting them: the client sees the same JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nextstate.core.records import Endpoint


@dataclass(frozen=True, slots=True)
class Asked:
    """What the client itself asked for; everything else added here is stripped."""

    token_ids: bool
    logprobs: bool
    usage_chunk: bool

    @property
    def everything(self) -> bool:
        return self.token_ids and self.logprobs and self.usage_chunk


def add_capture(body: dict[str, Any], endpoint: Endpoint) -> Asked:
    """Turn on token capture in ``body`` (in place); return what the client had asked for."""
    stream = bool(body.get("stream"))
    options = body.get("stream_options")
    asked = Asked(
        token_ids=bool(body.get("return_token_ids")),
        logprobs=_asked_logprobs(body, endpoint),
        usage_chunk=not stream
        or (isinstance(options, dict) and bool(options.get("include_usage"))),
    )
    body["return_token_ids"] = True
    if not asked.logprobs:
        if endpoint == "chat":
            body["logprobs"] = True
        else:
            body["logprobs"] = 0  # legacy completions: 0 means "the sampled token only"
    if stream and not asked.usage_chunk:
        body["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                  "include_usage": True}
    return asked


def _asked_logprobs(body: dict[str, Any], endpoint: Endpoint) -> bool:
    value = body.get("logprobs")
    if endpoint == "chat":
        return value is True
    return value is not None and value is not False


def strip_response(obj: dict[str, Any], asked: Asked, endpoint: Endpoint) -> dict[str, Any]:
    """A shallow copy of a complete response (or one stream chunk) as the client expects it.

    The original is left untouched: it is the record.
    """
    out = dict(obj)
    if not asked.token_ids and "prompt_token_ids" in out:
        out["prompt_token_ids"] = None
    choices = out.get("choices")
    if isinstance(choices, list):
        out["choices"] = [_strip_choice(c, asked) for c in choices]
    return out


def _strip_choice(choice: Any, asked: Asked) -> Any:
    if not isinstance(choice, dict):
        return choice
    out = dict(choice)
    if not asked.token_ids:
        for key in ("token_ids", "prompt_token_ids"):
            if key in out:
                out[key] = None
    if not asked.logprobs and "logprobs" in out:
        out["logprobs"] = None
    return out


def is_usage_chunk(chunk: dict[str, Any]) -> bool:
    """The final stream chunk added by ``include_usage``: no choices, only usage."""
    return chunk.get("choices") == [] and "usage" in chunk
