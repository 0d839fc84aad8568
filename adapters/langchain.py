"""LangChain adapter (agent -> proxy): one agent run, one nextstate session.

    from nextstate.adapters.langchain import NextStateCallbackHandler
    handler = NextStateCallbackHandler()            # or session_id="conversation-42"
    llm = handler.chat_openai(model="nextstate-toy")  # a ChatOpenAI wired to the proxy
    agent.invoke(inputs, config={"callbacks": [handler]})
    handler.feedback(-1, hint="Use the calculator tool.")

How it works: LangChain tells callbacks about every run before it happens, with its
parent, so the handler knows the run tree. When a chat model run starts, the handler
puts the run's session (the id given by the user, else the root run's id) and turn type
into a context variable; an httpx hook on the ChatOpenAI's HTTP client copies them into
``X-Session-Id`` / ``X-Turn-Type`` headers of the request that follows, and keeps the
``X-NextState-Turn-Id`` of the answer. Runs tagged ``side`` (``llm.with_config(
tags=["side"])``) are side calls. Tool results reach the proxy as next states with the
next model call; when the agent ends right after its tools ran, the handler sends them
itself (``POST /v1/next_state``) as the root run ends.
"""

from __future__ import annotations

import contextvars
import uuid
from collections.abc import Sequence
from typing import Any

import httpx
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import ToolMessage

from nextstate.adapters._client import (
    TURN_ID_HEADER,
    feedback_body,
    post,
    proxy_api_key,
    proxy_base_url,
)

SIDE_TAGS = frozenset({"side", "nextstate:side"})


class NextStateCallbackHandler(BaseCallbackHandler):
    # Called in the caller's own context (not an executor), so the context variable set
    # in on_chat_model_start is the one the HTTP hook reads.
    run_inline = True

    def __init__(self, session_id: str | None = None, *, base_url: str | None = None,
                 api_key: str | None = None, side_tags: Sequence[str] = tuple(SIDE_TAGS),
                 ) -> None:
        self.session_id = session_id
        self.base_url = proxy_base_url(base_url)
        self.api_key = proxy_api_key(api_key)
        self.side_tags = frozenset(side_tags)
        self._parents: dict[uuid.UUID, uuid.UUID | None] = {}
        self._current: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
            f"nextstate-{id(self)}", default=None)
        self._pending_tools: dict[str, list[dict[str, Any]]] = {}
        self.last_turn_id: str | None = None
        self.last_session_id: str | None = session_id

    # -- wiring a ChatOpenAI to the proxy --------------------------------------------------

    def http_client(self) -> httpx.Client:
        return httpx.Client(event_hooks={"request": [self._stamp], "response": [self._keep]},
                            timeout=600)

    def async_http_client(self) -> httpx.AsyncClient:
        async def stamp(request: httpx.Request) -> None:
            self._stamp(request)

        async def keep(response: httpx.Response) -> None:
            self._keep(response)

        return httpx.AsyncClient(event_hooks={"request": [stamp], "response": [keep]},
                                 timeout=600)

    def chat_openai(self, **kwargs: Any) -> Any:
        """A ``langchain_openai.ChatOpenAI`` talking to the proxy through this handler."""
        from langchain_openai import ChatOpenAI

        kwargs.setdefault("base_url", self.base_url)
        kwargs.setdefault("api_key", self.api_key or "unused")
        return ChatOpenAI(http_client=self.http_client(),
                          http_async_client=self.async_http_client(),
                          callbacks=[self], **kwargs)

    def _stamp(self, request: httpx.Request) -> None:
        current = self._current.get()
        if current is not None:
            request.headers["X-Session-Id"], request.headers["X-Turn-Type"] = current

    def _keep(self, response: httpx.Response) -> None:
        turn_id = response.headers.get(TURN_ID_HEADER)
        current = self._current.get()
        if turn_id and current is not None and current[1] == "main":
            self.last_turn_id = turn_id

    # -- the run tree ---------------------------------------------------------------------

    def _session_of(self, run_id: uuid.UUID) -> str:
        if self.session_id is not None:
            return self.session_id
        root = run_id
        while self._parents.get(root) is not None:
            root = self._parents[root]  # type: ignore[assignment]
        return root.hex

    def on_chain_start(self, serialized: dict[str, Any] | None, inputs: Any, *,
                       run_id: uuid.UUID, parent_run_id: uuid.UUID | None = None,
                       **kwargs: Any) -> None:
        self._parents[run_id] = parent_run_id

    def on_chat_model_start(self, serialized: dict[str, Any] | None, messages: Any, *,
                            run_id: uuid.UUID, parent_run_id: uuid.UUID | None = None,
                            tags: list[str] | None = None, **kwargs: Any) -> None:
        self._parents[run_id] = parent_run_id
        session = self._session_of(run_id)
        side = bool(self.side_tags.intersection(tags or ()))
        if not side:
            # This call's messages carry the tool results: they need no sending.
            self._pending_tools.pop(session, None)
            self.last_session_id = session
        self._current.set((session, "side" if side else "main"))

    def on_llm_end(self, response: Any, *, run_id: uuid.UUID, **kwargs: Any) -> None:
        self._current.set(None)

    def on_llm_error(self, error: BaseException, *, run_id: uuid.UUID, **kwargs: Any) -> None:
        self._current.set(None)

    def on_tool_start(self, serialized: dict[str, Any] | None, input_str: str, *,
                      run_id: uuid.UUID, parent_run_id: uuid.UUID | None = None,
                      **kwargs: Any) -> None:
        self._parents[run_id] = parent_run_id

    def on_tool_end(self, output: Any, *, run_id: uuid.UUID, **kwargs: Any) -> None:
        message: dict[str, Any] = {"role": "tool", "content": _text(output)}
        if isinstance(output, ToolMessage):
            message["tool_call_id"] = output.tool_call_id
            if output.status == "error":
                message["status"] = "error"
        self._pending_tools.setdefault(self._session_of(run_id), []).append(message)

    def on_tool_error(self, error: BaseException, *, run_id: uuid.UUID, **kwargs: Any) -> None:
        message = {"role": "tool", "content": f"Error: {type(error).__name__}: {error}",
                   "status": "error"}
        if kwargs.get("tool_call_id"):
            message["tool_call_id"] = kwargs["tool_call_id"]
        self._pending_tools.setdefault(self._session_of(run_id), []).append(message)

    def on_chain_end(self, outputs: Any, *, run_id: uuid.UUID,
                     parent_run_id: uuid.UUID | None = None, **kwargs: Any) -> None:
        if parent_run_id is None:
            self._finish(run_id)

    def on_chain_error(self, error: BaseException, *, run_id: uuid.UUID,
                       parent_run_id: uuid.UUID | None = None, **kwargs: Any) -> None:
        if parent_run_id is None:
            self._finish(run_id)

    def _finish(self, root: uuid.UUID) -> None:
        """The agent run ended: tool results no model call has seen become the last
        turn's next state; the run tree is forgotten."""
        session = self._session_of(root)
        pending = self._pending_tools.pop(session, None)
        if pending and self.last_turn_id is not None:
            post(self.base_url, self.api_key, "/next_state", {
                "turn_id": self.last_turn_id, "messages": pending,
                "source": "adapter:langchain"})
        for run in [r for r in self._parents if self._session_of(r) == session]:
            del self._parents[run]

    # -- feedback -------------------------------------------------------------------------

    def feedback(self, score: int, hint: str | None = None, *, comment: str | None = None,
                 ) -> dict[str, Any]:
        """Score the last main turn this handler saw (+1, 0 or -1), with an optional hint
        of what the reply should have done instead."""
        if self.last_turn_id is None and self.last_session_id is None:
            raise RuntimeError("no turn to give feedback on yet")
        body = feedback_body(score, turn_id=self.last_turn_id,
                             session_id=self.last_session_id, hint=hint, comment=comment,
                             source="adapter:langchain")
        return post(self.base_url, self.api_key, "/feedback", body)


def _text(output: Any) -> str:
    content = output.content if isinstance(output, ToolMessage) else output
    return content if isinstance(content, str) else str(content)
