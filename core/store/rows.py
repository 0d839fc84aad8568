"""How records become rows, and rows become the export format (proxy -> store -> export).

Pure functions used by `Store`: the turn row the writer inserts, the next state a later
request gives an earlier turn, and the shape `nextstate export` writes.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Row, Select, select

from nextstate.core.records import Assembled, TurnRecord, untrainable
from nextstate.core.sessions import next_state_of
from nextstate.core.store.schema import turns
from nextstate.core.tool_errors import tool_errors

EXPORT_COLUMNS = (
    "id", "session_id", "turn_index", "turn_type", "endpoint", "status", "http_status",
    "error", "model", "served_model", "created_at", "finished_at", "latency_ms", "ttft_ms",
    "request", "response", "prompt_token_ids", "completion_token_ids", "logprobs",
    "next_state", "next_state_kind", "next_state_status", "next_state_at", "next_turn_id",
    "tenant", "user", "redacted", "untrainable", "dialect", "lessons",
)


def text_or_none(value: Any) -> str | None:
    return value[:256] if isinstance(value, str) else None


def export_query() -> Select[Any]:
    return select(*(turns.c[name] for name in EXPORT_COLUMNS))


def export_row(row: Row[Any], given: list[Any]) -> dict[str, Any]:
    # Column names are SQLAlchemy `quoted_name`s; plain str keys serialise anywhere.
    data = {str(k): v for k, v in row._mapping.items()}
    data["turn_id"] = data.pop("id")
    data["feedback"] = given
    return data


def same_tenant(tenant: str | None) -> Any:
    return turns.c.tenant.is_(None) if tenant is None else turns.c.tenant == tenant


def turn_row(rec: TurnRecord, reply: Assembled, session_id: str, session: Any) -> dict[str, Any]:
    if rec.turn_type != "main" or rec.status != "ok":
        ns_status = "n/a"
    elif rec.session_done:
        ns_status = "none"
    else:
        ns_status = "pending"
    finished = rec.finished_at or rec.created_at
    response_choices = []
    for c in reply.choices:
        kept = {k: v for k, v in c.items() if c["index"] != 0 or k not in ("token_ids", "logprobs")}
        response_choices.append(kept)
    return {
        "id": rec.turn_id,
        "session_id": session_id,
        "turn_index": session.turn_count if session is not None else 0,
        "turn_type": rec.turn_type,
        "endpoint": rec.endpoint,
        "status": rec.status,
        "http_status": rec.http_status,
        "error": rec.error or reply.error,
        "model": text_or_none(rec.request.get("model")),
        "served_model": reply.served_model,
        "created_at": rec.created_at,
        "finished_at": finished,
        "latency_ms": round((finished - rec.created_at) * 1000, 3),
        "ttft_ms": rec.ttft_ms,
        "request": rec.request,
        "response": {"choices": response_choices, "usage": reply.usage},
        "prompt_token_ids": reply.prompt_token_ids,
        "completion_token_ids": reply.first("token_ids"),
        # Left out on purpose: NULL until the learner recomputes them.
        "logprobs": None if rec.logprobs_to_recompute and not reply.first("logprobs")
        else reply.first("logprobs"),
        "next_state_status": ns_status,
        "tenant": rec.tenant,
        "user": rec.user,
        "untrainable": untrainable(reply, rec.logprobs_to_recompute)
        if rec.status == "ok" else None,
        "dialect": rec.dialect,
        "lessons": rec.lessons,
    }


def next_state(conn: Connection, prev_id: str, rec: TurnRecord) -> list[dict[str, Any]]:
    messages = rec.request.get("messages")
    if rec.endpoint != "completions" and isinstance(messages, list):
        state = next_state_of(messages)
        return tool_errors(state, rec.dialect) if rec.endpoint == "messages" else state
    prompt = rec.request.get("prompt")
    prev = conn.execute(select(turns.c.request, turns.c.response)
                        .where(turns.c.id == prev_id)).first()
    if not isinstance(prompt, str) or prev is None:
        return []
    # Completions: the next state is what the new prompt adds after the previous
    # prompt and its completion (the whole prompt if it does not extend them).
    before = str(prev.request.get("prompt", "")) if isinstance(prev.request, dict) else ""
    choices = (prev.response or {}).get("choices") or [{}]
    before += str(choices[0].get("text", ""))
    added = prompt[len(before):] if before and prompt.startswith(before) else prompt
    return [{"role": "user", "content": added}] if added else []
