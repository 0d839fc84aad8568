"""OpenAI SDK helper (agent -> proxy): clients whose requests carry a session, plus feedback.

    from nextstate.adapters.openai import Session
    session = Session()                       # a new session id; or Session("my-id")
    client = session.client()                 # an openai.OpenAI pointed at the proxy
    reply = client.chat.completions.create(model="nextstate-toy", messages=[...])
    session.feedback(-1, hint="Answer in one sentence.")   # about the last turn
    session.outcome(1)                        # the whole episode: task done

Every request of ``session.client()`` / ``session.async_client()`` carries
``X-Session-Id`` and ``X-Turn-Type``; the proxy's ``X-NextState-Turn-Id`` answer is kept
as ``session.last_turn_id``, which ``feedback()`` scores unless told otherwise.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

import httpx
import openai

from nextstate.adapters._client import (
    TURN_ID_HEADER,
    feedback_body,
    post,
    proxy_api_key,
    proxy_base_url,
)


class Session:
    def __init__(self, session_id: str | None = None, *, turn_type: Literal["main", "side"]
                 = "main", base_url: str | None = None, api_key: str | None = None) -> None:
        self.id = session_id or uuid.uuid4().hex
        self.turn_type = turn_type
        self.base_url = proxy_base_url(base_url)
        self.api_key = proxy_api_key(api_key)
        self.last_turn_id: str | None = None

    def headers(self, turn_type: str | None = None, done: bool = False) -> dict[str, str]:
        headers = {"X-Session-Id": self.id, "X-Turn-Type": turn_type or self.turn_type}
        if done:
            headers["X-Session-Done"] = "true"
        return headers

    def client(self, **kwargs: Any) -> openai.OpenAI:
        """A sync OpenAI client for this session (kwargs go to ``openai.OpenAI``)."""
        http = httpx.Client(event_hooks={"response": [self._remember]}, timeout=600)
        # (openai 3 types http_client as httpx2's client; it takes httpx's: tests/adapters.)
        return openai.OpenAI(base_url=self.base_url, api_key=self.api_key or "unused",
                             default_headers=self.headers(),
                             http_client=http, **kwargs)  # type: ignore[arg-type]

    def async_client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        """An async OpenAI client for this session."""
        async def remember(response: httpx.Response) -> None:
            self._remember(response)

        http = httpx.AsyncClient(event_hooks={"response": [remember]}, timeout=600)
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key or "unused",
                                  default_headers=self.headers(),
                                  http_client=http, **kwargs)  # type: ignore[arg-type]

    def _remember(self, response: httpx.Response) -> None:
        turn_id = response.headers.get(TURN_ID_HEADER)
        if turn_id and self._is_main(response.request):
            self.last_turn_id = turn_id

    def _is_main(self, request: httpx.Request) -> bool:
        turn_type: str = request.headers.get("x-turn-type", "main")
        return turn_type != "side"

    def feedback(self, score: int, *, hint: str | None = None, comment: str | None = None,
                 turn_id: str | None = None) -> dict[str, Any]:
        """Score a turn: the one named, else the last main turn, else the session's last."""
        target = turn_id or self.last_turn_id
        body = feedback_body(score, turn_id=target, session_id=None if target else self.id,
                             hint=hint, comment=comment, source="adapter:openai")
        return post(self.base_url, self.api_key, "/feedback", body)

    def outcome(self, score: int, *, comment: str | None = None) -> dict[str, Any]:
        """The episode's outcome (a task done or failed): feedback for the whole session,
        which the learner adds to every step's reward (see "The learner")."""
        body = feedback_body(score, turn_id=None, session_id=self.id, hint=None,
                             comment=comment, source="adapter:openai")
        return post(self.base_url, self.api_key, "/feedback", body)

    def next_state(self, messages: list[dict[str, Any]], *, done: bool = False,
                   ) -> dict[str, Any]:
        """Report what followed the last reply when no further request will carry it
        (the agent stopped after its tools ran)."""
        body = {"session_id": self.id, "messages": messages, "done": done,
                "source": "adapter:openai"}
        return post(self.base_url, self.api_key, "/next_state", body)
