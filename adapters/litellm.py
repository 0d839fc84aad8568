"""A LiteLLM callback that records each chat call into a nextstate store.

agent -> LiteLLM (SDK or proxy) -> backend; LiteLLM callback -> nextstate store -> learner.
For teams that keep their traffic on LiteLLM instead of moving it onto the nextstate proxy:

    litellm.callbacks = [NextStateLogger("sqlite:///turns.db")]
    litellm.completion(model="hosted_vllm/my-model", api_base=..., messages=...,
                       metadata={"session_id": "s1"},
                       extra_body={"return_token_ids": True, "logprobs": True})

Each chat call becomes a `TurnRecord` for a daemon thread that writes batches to the store;
a full queue drops (counted in `stats`), a failing store is retried with backoff.

What reaches the callback depends on LiteLLM's version. The store checks what it got
(`nextstate.core.records.untrainable`): a turn is trainable only with the prompt's ids,
the completion's ids and a logprob a token, counts matching vLLM's usage; anything less
is kept, marked with the reason, and never trained on. Compared with the nextstate proxy
(seen with vLLM 0.32):
- Token ids only when the caller asks vLLM for them (``return_token_ids``, as above); the
  proxy asks on every request. Non-streaming, LiteLLM keeps them and the logprobs.
- Streaming: callbacks get LiteLLM's reassembled response (text, tool calls, finish
  reason, usage). LiteLLM 1.106 kept no token ids in it; 1.110 keeps the completion's
  (the sampled ones), but neither version keeps ``prompt_token_ids`` (they reach not even
  the client) nor the logprobs: streamed turns stay untrainable.
- Sessions: the SDK shows callbacks none of a call's ``extra_headers``, so pass
  ``metadata={"session_id": ..., "turn_type": ..., "session_done": ...}``. Behind the
  LiteLLM proxy, ``X-Session-Id``, ``X-Turn-Type`` and ``X-Session-Done`` headers work
  too. Turns without a session id are still paired by conversation matching.
- ``request`` is what LiteLLM sent the backend, not the client's body byte for byte. No
  ``aborted`` status and no spool file: records held in memory die with the process.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import orjson
from litellm.integrations.custom_logger import CustomLogger

from nextstate.core.paths import default_store_url
from nextstate.core.records import TurnRecord
from nextstate.core.store import Store

log = logging.getLogger("nextstate.adapters.litellm")
CHAT_CALLS = frozenset({"completion", "acompletion"})
# Kept besides model, messages and extra_body (vLLM's own); never LiteLLM's (keys, headers).
REQUEST_FIELDS = frozenset({
    "temperature", "top_p", "n", "stream", "stream_options", "stop", "max_tokens",
    "max_completion_tokens", "presence_penalty", "frequency_penalty", "logit_bias", "seed",
    "user", "response_format", "tools", "tool_choice", "parallel_tool_calls", "logprobs",
    "top_logprobs", "reasoning_effort", "functions", "function_call", "modalities"})


class TurnWriter(Protocol):
    def write(self, records: Sequence[TurnRecord]) -> int: ...


class TurnStore(Protocol):
    """What the writer needs from a store (`nextstate.core.store.Store` is one): the write
    path of its turns, and closing it."""

    @property
    def turns(self) -> TurnWriter: ...
    def close(self) -> None: ...


@dataclass
class WriterStats:
    submitted: int = 0
    written: int = 0  # new turns in the store (an event LiteLLM sends twice counts once)
    dropped: int = 0  # queue full, unreadable call, or still unwritten at close()
    store_errors: int = 0
    last_error: str | None = None


class NextStateLogger(CustomLogger):
    """Register with ``litellm.callbacks = [logger]``; call `close` at shutdown."""

    def __init__(self, store_url: str | None = None, *, session_key: str = "session_id",
                 store: TurnStore | None = None, queue_size: int = 1024,
                 batch_size: int = 64, max_backoff: float = 30.0) -> None:
        super().__init__()
        self.session_key = session_key
        self._owns_store = store is None
        self.store: TurnStore = store or Store(store_url or default_store_url())
        self.stats = WriterStats()
        self.batch_size, self.max_backoff = batch_size, max_backoff
        self._queue: queue.Queue[TurnRecord] = queue.Queue(maxsize=queue_size)
        self._outstanding = 0  # accepted, not yet written
        self._idle = threading.Condition()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nextstate-litellm", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    # LiteLLM's hooks: they never block (a queue put) and never raise.
    def log_success_event(self, kwargs: dict[str, Any], response_obj: Any,
                          start_time: Any, end_time: Any) -> None:
        self._submit(kwargs, response_obj, start_time, end_time, failed=False)

    def log_failure_event(self, kwargs: dict[str, Any], response_obj: Any,
                          start_time: Any, end_time: Any) -> None:
        self._submit(kwargs, response_obj, start_time, end_time, failed=True)

    async def async_log_success_event(self, kwargs: dict[str, Any], response_obj: Any,
                                      start_time: Any, end_time: Any) -> None:
        self._submit(kwargs, response_obj, start_time, end_time, failed=False)

    async def async_log_failure_event(self, kwargs: dict[str, Any], response_obj: Any,
                                      start_time: Any, end_time: Any) -> None:
        self._submit(kwargs, response_obj, start_time, end_time, failed=True)

    def _submit(self, kwargs: dict[str, Any], response_obj: Any, start_time: Any,
                end_time: Any, *, failed: bool) -> None:
        if kwargs.get("call_type") not in CHAT_CALLS or kwargs.get("litellm_no_upstream_llm_call"):
            return  # not a chat call, or rejected by LiteLLM's router before any backend
        with self._idle:
            self.stats.submitted += 1
            self._outstanding += 1
        try:
            record = self.turn_record(kwargs, response_obj, start_time, end_time, failed=failed)
            self._queue.put_nowait(record)
        except Exception as exc:  # queue.Full, or a call shaped unlike any seen so far
            with self._idle:
                self.stats.dropped += 1
                self._outstanding -= 1
                self._idle.notify_all()
            log.warning("dropped a LiteLLM call record: %s: %s", type(exc).__name__, exc)

    def turn_record(self, kwargs: Mapping[str, Any], response_obj: Any, start_time: Any,
                    end_time: Any, *, failed: bool = False) -> TurnRecord:
        """The record of one LiteLLM call, from the arguments LiteLLM gives its hooks."""
        params = kwargs.get("litellm_params") or {}
        meta = params.get("metadata") or {}
        headers = {str(k).lower(): str(v) for k, v in (meta.get("headers") or {}).items()}
        optional = kwargs.get("optional_params") or {}
        request = _jsonable({"model": kwargs.get("model"), "messages": kwargs.get("messages"),
                             **{k: v for k, v in optional.items() if k in REQUEST_FIELDS},
                             **(optional.get("extra_body") or {})})
        session_id = (meta.get(self.session_key) or meta.get("session_id")
                      or headers.get("x-session-id") or params.get("litellm_session_id"))
        error = (kwargs.get("exception") or "unknown error") if failed else None
        created_at = _timestamp(start_time) or time.time()
        first_token = _timestamp(kwargs.get("completion_start_time"))
        # LiteLLM's call id: an event LiteLLM dispatches twice is stored once.
        call_id = str(kwargs.get("litellm_call_id") or uuid.uuid4().hex)
        return TurnRecord(
            turn_id=f"{call_id}-failed" if failed else call_id,
            endpoint="chat",
            created_at=created_at,
            request=request,
            session_id=str(session_id) if session_id else None,
            turn_type=str(meta.get("turn_type") or headers.get("x-turn-type") or "main"),
            session_done=str(meta.get("session_done", headers.get("x-session-done"))).lower()
            in ("true", "1"),
            status="ok" if error is None else "upstream_error",
            http_status=getattr(error, "status_code", None) if error is not None else 200,
            error=None if error is None else str(error),  # LiteLLM's text, vLLM's body in it
            response=None if error is not None else _response(response_obj),
            finished_at=_timestamp(end_time) or created_at,
            ttft_ms=(round((first_token - created_at) * 1000, 3)
                     if request.get("stream") and first_token is not None else None),
        )

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every record accepted so far is in the store; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._outstanding == 0, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (waiting up to ``timeout``), then stop the writer. What is
        still unwritten then is counted as dropped. Idempotent; also runs at exit."""
        if self._closing.is_set():
            return
        self.flush(timeout)
        self._closing.set()
        self._thread.join(timeout=5.0)
        with self._idle:
            self.stats.dropped += self._outstanding
            self._outstanding = 0
            self._idle.notify_all()
        if self._owns_store:
            self.store.close()
        atexit.unregister(self.close)

    def _run(self) -> None:
        batch: list[TurnRecord] = []
        backoff = 0.5
        while not self._closing.is_set():
            if not batch:
                try:
                    batch.append(self._queue.get(timeout=0.2))
                except queue.Empty:
                    continue
            while len(batch) < self.batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                written = self.store.turns.write(batch)
            except Exception as exc:  # store down, locked, full: keep the batch, retry later
                self.stats.store_errors += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"[:500]
                log.warning("store unavailable, retrying in %.1fs: %s", backoff, exc)
                self._closing.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            backoff = 0.5
            with self._idle:
                self.stats.written += written
                self._outstanding -= len(batch)
                self._idle.notify_all()
            batch = []


def _response(obj: Any) -> dict[str, Any] | None:
    """LiteLLM's ModelResponse as vLLM's JSON: the fields LiteLLM moves under
    ``provider_specific_fields`` (``token_ids``, ``stop_reason``, ``reasoning``...) go
    back where vLLM put them."""
    raw = obj.model_dump() if hasattr(obj, "model_dump") else obj
    if not isinstance(raw, dict):
        return None
    data: dict[str, Any] = _jsonable(raw)
    _put_back(data)
    # LiteLLM renames the model to the one the client named; keep the one that answered.
    hidden = getattr(obj, "_hidden_params", None) or {}
    data["model"] = hidden.get("provider_response_model") or data.get("model")
    if not (data.get("usage") or {}).get("total_tokens"):
        data["usage"] = None  # a stream without include_usage: LiteLLM reports zeros
    for choice in data.get("choices") or []:
        _put_back(choice)
        if isinstance(choice.get("message"), dict):
            _put_back(choice["message"])
    return data


def _put_back(obj: dict[str, Any]) -> None:
    moved = obj.pop("provider_specific_fields", None) or {}
    obj.update({k: v for k, v in moved.items() if obj.get(k) is None})


def _jsonable(obj: Any) -> Any:
    """A plain-JSON copy for the store: pydantic models dumped, other unknowns as str."""
    dumped = orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS,
                          default=lambda v: v.model_dump() if hasattr(v, "model_dump") else str(v))
    return orjson.loads(dumped)


def _timestamp(value: Any) -> float | None:
    """Unix time from LiteLLM's start/end times (naive local datetimes)."""
    return value.timestamp() if isinstance(value, datetime) else None
