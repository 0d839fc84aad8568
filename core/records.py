"""What the proxy hands to the recorder, and how a turn's reply is assembled for the store.

agent -> proxy -> vLLM; proxy -> store. The request path does as little as possible: it
fills a `TurnRecord` with the client's request and vLLM's untouched reply (the whole
JSON, or the list of stream chunks) and hands it to the recorder. `assemble` runs in the
writer, off the request path, and turns that into choices with their exact token ids
and logprobs as vLLM returned them: nothing is ever re-tokenized.

Feedback (`FeedbackRecord`) and next states reported by clients (`NextStateRecord`)
travel through the same journal (`encode`, `decode`), so they are written in order after
the turns they name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

# The two relayed, recorded endpoints (chat completions and completions).
Endpoint = Literal["chat", "completions"]
# The API a turn came in on: chat, completions, or a dialect spoken over chat (Anthropic
# Messages, OpenAI Responses: their record is the chat exchange, proxy/dialects/).
Recorded = Literal["chat", "completions", "messages", "responses"]
Status = Literal["ok", "upstream_error", "aborted"]


@dataclass(slots=True)
class TurnRecord:
    turn_id: str
    endpoint: Recorded
    created_at: float
    request: dict[str, Any]  # the client's body, minus the proxy's own session fields
    session_id: str | None = None
    turn_type: str = "main"
    session_done: bool = False
    status: Status = "ok"
    http_status: int | None = None
    error: str | None = None
    response: dict[str, Any] | None = None  # non-streaming: vLLM's whole JSON
    chunks: list[dict[str, Any]] = field(default_factory=list)  # streaming: every chunk
    finished_at: float | None = None
    ttft_ms: float | None = None
    tenant: str | None = None
    user: str | None = None  # whose turn: X-NextState-User within the tenant, else the tenant
    # Opt-in feedback sent with this request about the session's previous turn (or the
    # turn named by X-NextState-Feedback-For).
    feedback: dict[str, Any] | None = None
    # A dialect turn's own request and answer, beside the chat exchange the model saw
    # (``request``, ``response``): {"request", "response", "store"} (proxy/dialects/).
    dialect: dict[str, Any] | None = None
    # The lessons the proxy's memory added to the prompt, and where (core/hints.py):
    # {"ids", "hint", "message", "part", "offset", "added"}. ``request`` stays the
    # client's; the prompt token ids vLLM returns are what the model saw.
    lessons: dict[str, Any] | None = None
    # The proxy left sampled-token logprobs out: the learner recomputes them (capture.py).
    logprobs_to_recompute: bool = False


@dataclass(slots=True)
class FeedbackRecord:
    """A score (+1, 0, -1) and optional hint for a turn, or for a session's last turn."""

    feedback_id: str
    created_at: float
    score: int
    source: str  # header | endpoint | adapter:<name>
    turn_id: str | None = None
    session_id: str | None = None
    hint: str | None = None
    comment: str | None = None
    tenant: str | None = None


@dataclass(slots=True)
class NextStateRecord:
    """A next state reported by a client rather than seen in a request: e.g. the tool
    results of an agent that ended right after calling tools."""

    record_id: str
    created_at: float
    messages: list[dict[str, Any]]
    source: str
    turn_id: str | None = None
    session_id: str | None = None
    done: bool = False
    tenant: str | None = None


Record = TurnRecord | FeedbackRecord | NextStateRecord
_KINDS: dict[str, type[TurnRecord] | type[FeedbackRecord] | type[NextStateRecord]] = {
    "turn": TurnRecord, "feedback": FeedbackRecord, "next_state": NextStateRecord}
_OPEN = {cls: b'{"kind":"' + kind.encode() + b'",' for kind, cls in _KINDS.items()}


def encode(record: Record) -> bytes:
    """The record as one JSON line ending in a newline, ``{"kind": ..., <fields>}``:
    what the journal holds. orjson serialises the dataclass itself (~10 µs a whole turn,
    ~20 µs a 32-chunk stream; `dataclasses.asdict` would first copy every nested value).
    Raises TypeError for a value JSON cannot hold."""
    return _OPEN[type(record)] + orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)[1:]


def decode(line: bytes) -> Record:
    """`encode`'s line back as its record."""
    return record_from_dict(orjson.loads(line))


def record_from_dict(data: dict[str, Any]) -> Record:
    data = dict(data)
    return _KINDS[data.pop("kind", "turn")](**data)


@dataclass(slots=True)
class Assembled:
    """A turn's reply, whichever way it was delivered."""

    served_model: str | None
    choices: list[dict[str, Any]]
    usage: dict[str, Any] | None
    prompt_token_ids: list[int] | None
    error: str | None = None

    def first(self, key: str) -> Any:
        return self.choices[0].get(key) if self.choices else None


# A turn whose sampler logprobs the learner has yet to recompute (`untrainable` until then).
TO_RECOMPUTE = "waiting for the learner to recompute its sampler logprobs"


def untrainable(reply: Assembled, recompute: bool = False) -> str | None:
    """Why the first choice's tokens cannot be trained on, or None when they are exactly
    what vLLM sampled: the prompt's ids, the completion's ids and one sampler logprob a
    token, their counts matching the usage vLLM reported. Through the proxy they always
    are; a client-side recorder (the LiteLLM callback) gets whatever its library passed
    on, which depends on the library's version. ``recompute``: the logprobs were left out
    on purpose; the turn waits for the learner (`TO_RECOMPUTE`) if the rest holds."""
    ids = reply.first("token_ids") or []
    logprobs = reply.first("logprobs") or []
    usage = reply.usage or {}
    if not reply.prompt_token_ids:
        return "no prompt token ids"
    if not ids:
        return "no completion token ids"
    if recompute and not logprobs:
        problem = _counts_problem(reply, ids, usage)
        return problem if problem is not None else TO_RECOMPUTE
    if len(logprobs) != len(ids):
        return f"{len(logprobs)} sampler logprobs for {len(ids)} tokens"
    return _counts_problem(reply, ids, usage)


def _counts_problem(reply: Assembled, ids: list[int], usage: dict[str, Any]) -> str | None:
    assert reply.prompt_token_ids is not None
    if not usage:
        return "no usage to check the token counts against"
    sampled = sum(len(c.get("token_ids") or []) for c in reply.choices)
    if (usage.get("completion_tokens"), usage.get("prompt_tokens")) != (
            sampled, len(reply.prompt_token_ids)):
        return (f"token counts ({len(reply.prompt_token_ids)} prompt, {sampled} completion) "
                f"differ from usage ({usage.get('prompt_tokens')}, "
                f"{usage.get('completion_tokens')})")
    return None


def assemble(record: TurnRecord) -> Assembled:
    endpoint: Endpoint = "completions" if record.endpoint == "completions" else "chat"
    if record.response is not None:
        return _from_response(record.response, endpoint)
    return _from_chunks(record.chunks, endpoint)


def _sampled_logprobs(logprobs: Any, endpoint: Endpoint) -> list[float]:
    if not isinstance(logprobs, dict):
        return []
    if endpoint == "chat":
        return [entry.get("logprob") for entry in logprobs.get("content") or []]
    return list(logprobs.get("token_logprobs") or [])


def _from_response(obj: dict[str, Any], endpoint: Endpoint) -> Assembled:
    choices = []
    for c in obj.get("choices") or []:
        out: dict[str, Any] = {
            "index": c.get("index", 0),
            "finish_reason": c.get("finish_reason"),
            "token_ids": c.get("token_ids") or [],
            "logprobs": _sampled_logprobs(c.get("logprobs"), endpoint),
        }
        if endpoint == "chat":
            out["message"] = _clean_message(c.get("message") or {})
        else:
            out["text"] = c.get("text", "")
        choices.append(out)
    prompt_ids = obj.get("prompt_token_ids")
    if prompt_ids is None and choices and endpoint == "completions":
        prompt_ids = (obj.get("choices") or [{}])[0].get("prompt_token_ids")
    error = obj.get("error")
    return Assembled(
        served_model=obj.get("model"),
        choices=choices,
        usage=obj.get("usage"),
        prompt_token_ids=prompt_ids,
        error=str(error) if error else None,
    )


def _clean_message(message: dict[str, Any]) -> dict[str, Any]:
    """The assistant message without vLLM's always-null extras."""
    return {k: v for k, v in message.items() if v is not None or k == "content"}


def _from_chunks(chunks: list[dict[str, Any]], endpoint: Endpoint) -> Assembled:
    served_model = None
    usage = None
    prompt_ids: list[int] | None = None
    error: str | None = None
    acc: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        served_model = chunk.get("model") or served_model
        usage = chunk.get("usage") or usage
        if chunk.get("error"):
            error = str(chunk["error"])
        if chunk.get("prompt_token_ids"):
            prompt_ids = chunk["prompt_token_ids"]
        for c in chunk.get("choices") or []:
            index = c.get("index", 0)
            slot = acc.get(index)
            if slot is None:
                slot = acc[index] = _new_slot()
            if c.get("prompt_token_ids"):
                prompt_ids = c["prompt_token_ids"]
            slot["token_ids"].extend(c.get("token_ids") or [])
            slot["logprobs"].extend(_sampled_logprobs(c.get("logprobs"), endpoint))
            if c.get("finish_reason"):
                slot["finish_reason"] = c["finish_reason"]
            if endpoint == "chat":
                _merge_delta(slot, c.get("delta") or {})
            else:
                slot["text"].append(c.get("text") or "")
    choices = [_finish_slot(i, slot, endpoint) for i, slot in sorted(acc.items())]
    return Assembled(served_model, choices, usage, prompt_ids, error)


def _new_slot() -> dict[str, Any]:
    return {"token_ids": [], "logprobs": [], "finish_reason": None, "text": [],
            "reasoning": [], "tool_calls": {}, "role": "assistant"}


def _merge_delta(slot: dict[str, Any], delta: dict[str, Any]) -> None:
    if delta.get("role"):
        slot["role"] = delta["role"]
    if delta.get("content"):
        slot["text"].append(delta["content"])
    if delta.get("reasoning"):
        slot["reasoning"].append(delta["reasoning"])
    for call in delta.get("tool_calls") or []:
        target = slot["tool_calls"].setdefault(
            call.get("index", 0),
            {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
        )
        if call.get("id"):
            target["id"] = call["id"]
        fn = call.get("function") or {}
        target["function"]["name"] += fn.get("name") or ""
        target["function"]["arguments"] += fn.get("arguments") or ""


def _finish_slot(index: int, slot: dict[str, Any], endpoint: Endpoint) -> dict[str, Any]:
    out: dict[str, Any] = {
        "index": index,
        "finish_reason": slot["finish_reason"],
        "token_ids": slot["token_ids"],
        "logprobs": slot["logprobs"],
    }
    if endpoint != "chat":
        out["text"] = "".join(slot["text"])
        return out
    message: dict[str, Any] = {"role": slot["role"], "content": "".join(slot["text"])}
    if slot["tool_calls"]:
        message["tool_calls"] = [slot["tool_calls"][i] for i in sorted(slot["tool_calls"])]
        if not message["content"]:
            message["content"] = None
    if slot["reasoning"]:
        message["reasoning"] = "".join(slot["reasoning"])
    out["message"] = message
    return out
