"""The OpenAI SDK helper against the real proxy and vLLM."""

from __future__ import annotations

import pytest

from nextstate.adapters.openai import Session
from tests.conftest import MODEL_NAME

pytestmark = pytest.mark.integration
ASK = {"model": MODEL_NAME, "temperature": 0, "max_tokens": 6}


def test_session_clients_tag_requests_and_feedback_scores_the_last_turn(proxy):
    session = Session("sdk-1", base_url=proxy.base_url)
    client = session.client()
    client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], **ASK)
    first_id = session.last_turn_id
    client.chat.completions.create(messages=[{"role": "user", "content": "Hi again"}], **ASK)
    session.feedback(1, comment="good")
    turns = proxy.turns(2, session_id="sdk-1")
    assert [t["turn_id"] for t in turns][1] == session.last_turn_id != first_id
    assert turns[0]["next_state"] == [{"role": "user", "content": "Hi again"}]
    for _ in range(100):
        if proxy.turns(2, session_id="sdk-1")[1]["feedback"]:
            break
    given = proxy.turns(2, session_id="sdk-1")[1]["feedback"]
    assert [(g["score"], g["comment"], g["source"]) for g in given] == [
        (1, "good", "adapter:openai")]


async def test_async_client_and_side_turns(proxy):
    session = Session("sdk-2", base_url=proxy.base_url)
    side = Session("sdk-2", turn_type="side", base_url=proxy.base_url)
    await session.async_client().chat.completions.create(
        messages=[{"role": "user", "content": "Hi"}], **ASK)
    main_id = session.last_turn_id
    await side.async_client().chat.completions.create(
        messages=[{"role": "user", "content": "Summarise"}], **ASK)
    turns = proxy.turns(2, session_id="sdk-2")
    assert [t["turn_type"] for t in turns] == ["main", "side"]
    assert turns[0]["turn_id"] == main_id
    assert side.last_turn_id is None  # side turns are never feedback targets
