"""The client's view, made comparable: ids and timestamps aside, stream chunking aside.

Two answers to the same request at temperature 0 (vLLM's own dialect route, and the chat
route through the translation) must be equal after `view`: every id is replaced by its
kind and the order it first appeared in (so an id that must repeat, an item's id in its
events, still has to repeat), timestamps and thinking signatures by placeholders. For
streams, `events` parses the SSE and merges consecutive deltas of one block or item:
where vLLM cuts a text into chunks depends on timing, not on the request.
"""

from __future__ import annotations

from typing import Any

import orjson

ID_KEYS = {"id", "call_id", "item_id", "tool_use_id"}
TIME_KEYS = {"created_at", "created"}
DELTAS = {
    "content_block_delta": ("index",),
    "response.output_text.delta": ("item_id", "output_index", "content_index"),
    "response.function_call_arguments.delta": ("item_id", "output_index"),
    "response.reasoning_text.delta": ("item_id", "output_index", "content_index"),
}


def view(obj: Any) -> Any:
    """``obj`` with ids numbered by first appearance and timestamps zeroed."""
    seen: dict[str, str] = {}

    def walk(value: Any, key: str | None = None) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [walk(v) for v in value]
        if key in ID_KEYS and isinstance(value, str):
            prefix = value.split("_")[0] if "_" in value else key
            return seen.setdefault(value, f"<{prefix}#{len(seen)}>")
        if key in TIME_KEYS and isinstance(value, int | float):
            return 0
        if key == "signature" and isinstance(value, str):
            return "<signature>"
        return value

    return walk(obj)


def events(raw: bytes) -> list[tuple[str | None, Any]]:
    """An SSE body as (event name, data) pairs, consecutive deltas merged."""
    out: list[tuple[str | None, Any]] = []
    for block in raw.split(b"\n\n"):
        name, data = None, None
        for line in block.splitlines():
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                payload = line[5:].strip()
                data = payload.decode() if payload == b"[DONE]" else orjson.loads(payload)
        if data is None:
            continue
        kind = data.get("type") if isinstance(data, dict) else None
        if out and kind in DELTAS and _same_target(out[-1][1], data, DELTAS[kind]):
            out[-1] = (name, _merged(out[-1][1], data))
        else:
            out.append((name, data))
    for number, (_, data) in enumerate(out):
        if isinstance(data, dict) and "sequence_number" in data:
            data["sequence_number"] = number
    return out


def _same_target(last: Any, data: dict[str, Any], keys: tuple[str, ...]) -> bool:
    return isinstance(last, dict) and last.get("type") == data["type"] and all(
        last.get(k) == data.get(k) for k in keys) and _delta_kind(last) == _delta_kind(data)


def _delta_kind(data: dict[str, Any]) -> Any:
    delta = data.get("delta")
    return delta.get("type") if isinstance(delta, dict) else None


def _merged(last: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    merged = dict(last)
    if isinstance(data.get("delta"), dict):
        delta = dict(last["delta"])
        for key in ("text", "partial_json", "thinking"):
            if key in delta:
                delta[key] += data["delta"][key]
        merged["delta"] = delta
    else:
        merged["delta"] = last["delta"] + data["delta"]
        if "logprobs" in data:
            merged["logprobs"] = last["logprobs"] + data["logprobs"]
    return merged


def uncached(obj: Any) -> Any:
    """``obj`` with the prefix cache's share of the prompt folded back into the prompt.

    How much of a prompt vLLM finds in its prefix cache depends on what ran before (the
    second of two identical requests finds more), not on the route; the prompt's size
    does not. Anthropic usage keeps the total in ``input_tokens``; Responses usage zeroes
    the cache counts (the chat route reports them only with
    ``--enable-prompt-tokens-details``)."""
    if isinstance(obj, list | tuple):
        return [uncached(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out = {k: uncached(v) for k, v in obj.items()}
    if "input_tokens" in out and "output_tokens" in out and "total_tokens" not in out:
        for key in ("cache_read_input_tokens", "cache_creation_input_tokens"):
            out["input_tokens"] += out.pop(key, 0) or 0
    if "cached_tokens" in out and "cache_write_tokens" in out:
        out["cached_tokens"] = out["cache_write_tokens"] = 0
    return out
