"""Every answer a client gets is in the journal before the client has its end: the whole
body, the stream's [DONE], an error; feedback before its acknowledgement."""

import httpx
import orjson
import pytest
from starlette.testclient import TestClient

from nextstate.core.records import decode
from nextstate.proxy.app import make_app
from nextstate.proxy.settings import ProxySettings
from tests.proxy.fake_vllm import FakeVLLM

CHAT = {"model": "toy", "messages": [{"role": "user", "content": "hi"}]}


def spying(app, seen):
    """The app, noting what the journal holds each time the client is sent the end of
    its answer (the last body message, or the one carrying the stream's [DONE])."""

    async def wrapper(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)

        async def spy(message):
            end = message["type"] == "http.response.body" and (
                not message.get("more_body") or b"[DONE]" in message.get("body", b""))
            if end:
                journal = scope["state"]["deps"].recorder.journal
                seen.append([decode(line) for path in sorted(
                    journal.directory.glob("journal-*.jsonl"))
                    for line in path.read_bytes().splitlines()])
            await send(message)

        await app(scope, receive, spy)

    return wrapper


@pytest.fixture
def spied(tmp_path):
    seen: list = []
    fake = FakeVLLM()
    app = make_app(ProxySettings(backends=("http://vllm",), store_url=f"sqlite:///{tmp_path}/s.db",
                                 spool_dir=tmp_path / "spool"), transport=httpx.MockTransport(fake))
    with TestClient(spying(app, seen)) as client:
        yield client, seen, fake


def test_a_whole_reply_is_in_the_journal_before_its_body_is_sent(spied):
    client, seen, _ = spied
    answer = client.post("/v1/chat/completions", json=CHAT)
    assert answer.status_code == 200
    [turn] = seen[0]
    assert turn.turn_id == answer.headers["x-nextstate-turn-id"]
    assert turn.status == "ok" and turn.response["choices"][0]["token_ids"] == [11, 12, 13]


def test_a_stream_is_in_the_journal_before_its_done_is_sent(spied):
    client, seen, _ = spied
    with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        body = b"".join(r.iter_bytes())
    assert body.endswith(b"data: [DONE]\n\n")
    [turn] = seen[0]  # when [DONE] went out: the whole turn, every chunk
    assert turn.status == "ok"
    assert [t for c in turn.chunks for ch in c["choices"] for t in ch.get("token_ids") or []
            ] == [11, 12, 13]
    assert any(c.get("usage") for c in turn.chunks)


def test_an_upstream_error_is_in_the_journal_before_it_is_answered(spied):
    client, seen, fake = spied
    fake.fail_with = 400
    answer = client.post("/v1/chat/completions", json=CHAT)
    assert answer.status_code == 400
    [turn] = seen[0]
    assert (turn.status, turn.http_status) == ("upstream_error", 400)


def test_feedback_is_in_the_journal_before_it_is_acknowledged(spied):
    client, seen, _ = spied
    turn_id = client.post("/v1/chat/completions", json=CHAT).headers["x-nextstate-turn-id"]
    answer = client.post("/v1/feedback", json={"turn_id": turn_id, "score": -1, "hint": "no"})
    assert answer.status_code == 200
    feedback = seen[-1][-1]
    assert feedback.feedback_id == orjson.loads(answer.content)["id"]
