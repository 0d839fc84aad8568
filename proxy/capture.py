"""Token capture: what the proxy adds to an upstream request and strips from the reply.

agent -> proxy -> vLLM. To record exact tokens the proxy asks vLLM for
``return_token_ids``, sampled-token ``logprobs`` and (when streaming) the usage chunk,
then hands the client back exactly what it would have got without those options.
vLLM answers ``null`` for token ids and logprobs nobody asked for, so "stripping" means
resetting those keys to ``null``, never deleting them: the client sees the same JSON.

Sampled-token logprobs are most of what capture costs vLLM (bench/README, "The tax").
With ``sampler_logprobs = "recompute"`` the proxy asks for token ids only wherever the
learner can recompute the logprobs exactly afterwards (`recomputable`), as one prefill of
the recorded tokens under the version that served them (learner/sampler_logprobs.py).
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
    # The proxy asked vLLM for the sampled tokens' logprobs (False: the learner recomputes
    # them, and the reply carries none to strip).
    sampler_logprobs: bool = True

    @property
    def everything(self) -> bool:
        """Nothing the proxy added is in the reply: it goes to the client as it is."""
        return self.token_ids and (self.logprobs or not self.sampler_logprobs) \
            and self.usage_chunk


def add_capture(body: dict[str, Any], endpoint: Endpoint, recompute: bool = False) -> Asked:
    """Turn on token capture in ``body`` (in place); return what the client had asked for.

    ``recompute``: leave sampled-token logprobs out where `recomputable` says the learner
    can recompute them exactly."""
    stream = bool(body.get("stream"))
    options = body.get("stream_options")
    logprobs = _asked_logprobs(body, endpoint)
    asked = Asked(
        token_ids=bool(body.get("return_token_ids")),
        logprobs=logprobs,
        usage_chunk=not stream
        or (isinstance(options, dict) and bool(options.get("include_usage"))),
        sampler_logprobs=logprobs or not (recompute and recomputable(body)),
    )
    body["return_token_ids"] = True
    if not asked.logprobs and asked.sampler_logprobs:
        if endpoint == "chat":
            body["logprobs"] = True
        else:
            body["logprobs"] = 0  # legacy completions: 0 means "the sampled token only"
    if stream and not asked.usage_chunk:
        body["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                  "include_usage": True}
    return asked


# Sampling fields that change the distribution vLLM samples from, with the values that
# leave it alone. vLLM's processed logprobs (`--logprobs-mode processed_logprobs`) are the
# model's own log-softmax only when every one of them is neutral and the temperature is 1
# or 0 (greedy requests are not temperature-scaled): then a prefill's ``prompt_logprobs``
# give the same numbers. Guided decoding masks the logits, so it counts as a change too.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "top_p": (None, 1, 1.0), "top_k": (None, -1, 0), "min_p": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0), "logit_bias": (None, {}),
    "bad_words": (None, []), "allowed_token_ids": (None,), "min_tokens": (None, 0),
    "use_beam_search": (None, False), "structured_outputs": (None,),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,),
    "guided_grammar": (None,), "vllm_xargs": (None,), "logits_processors": (None,),
    "thinking_token_budget": (None,),
}


def recomputable(body: dict[str, Any]) -> bool:
    """Whether the sampled tokens' logprobs can be recomputed exactly after the fact: the
    request sets its temperature to 0 or 1 and nothing else that shapes the distribution
    (`_NEUTRAL`; a json_schema response format, a required or named tool choice), and
    its messages are text.

    A temperature left out is vLLM's default, which a model's generation config may
    change, so it does not count; nor do a backend's defaults for the other fields, which
    is why recomputing needs a vLLM whose defaults are neutral (``nextstate doctor``)."""
    temperature = body.get("temperature")
    if temperature not in (0, 1) or isinstance(temperature, bool):
        return False
    for name, neutral in _NEUTRAL.items():
        if name in body and body[name] not in neutral:
            return False
    response_format = body.get("response_format")
    if response_format is not None and not (
            isinstance(response_format, dict) and response_format.get("type") == "text"):
        return False
    if body.get("tool_choice") not in (None, "auto", "none"):
        return False
    return not _has_media(body.get("messages"))


def _has_media(messages: Any) -> bool:
    """Any content part that is not text (an image): a token-id prefill can't carry it."""
    if not isinstance(messages, list):
        return False
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
                isinstance(part, dict) and part.get("type") not in ("text", None)
                for part in content):
            return True
    return False


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
    if not asked.logprobs and asked.sampler_logprobs and "logprobs" in out:
        out["logprobs"] = None
    return out


def is_usage_chunk(chunk: dict[str, Any]) -> bool:
    """The final stream chunk added by ``include_usage``: no choices, only usage."""
    return chunk.get("choices") == [] and "usage" in chunk
