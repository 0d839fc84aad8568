"""In front of any OpenAI-compatible provider: token capture off, memory on. The backend
here refuses vLLM's extra fields, as hosted APIs do."""

import httpx
import orjson

from nextstate.core.hints import HINT_MARKER
from nextstate.core.store import Store
from nextstate.proxy.settings import MemorySettings
from tests.conftest import RETRIEVAL_ROOM_MS
from tests.proxy.test_app import open_client, records

VLLM_ONLY = ("return_token_ids", "prompt_logprobs")
ASK = "Ben has 3 apples and buys 2 more. How many apples does Ben have now?"


class Provider:
    """An OpenAI-compatible server that knows nothing of vLLM: a 400 for its fields, for
    logprobs nobody asked for, for a usage chunk nobody asked for."""

    def __init__(self) -> None:
        self.requests: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        self.requests.append(body)
        unknown = [k for k in VLLM_ONLY if k in body]
        if unknown or "logprobs" in body or "stream_options" in body:
            return httpx.Response(400, json={"error": {
                "message": f"Unrecognized request arguments: {unknown or list(body)}",
                "type": "invalid_request_error", "param": None, "code": None}})
        if body.get("stream"):
            events = [{"id": "c", "object": "chat.completion.chunk", "model": "m",
                       "choices": [{"index": 0, "delta": {"content": piece},
                                    "finish_reason": None if piece else "stop"}]}
                      for piece in ("Five", " apples.", "")]
            data = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)
            return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                  content=data + b"data: [DONE]\n\n")
        return httpx.Response(200, json={
            "id": "c", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "Five apples."}}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23}})


CHAT = {"model": "m", "messages": [{"role": "user", "content": ASK}]}


def test_with_capture_on_such_a_provider_refuses_the_request(tmp_path):
    with open_client(tmp_path, Provider()) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 400


def test_with_capture_off_the_turn_is_recorded_as_text_and_the_lessons_still_served(
        tmp_path):
    store = Store(f"sqlite:///{tmp_path}/s.db")
    store.lessons.learn("Say how many apples in words.", tenant=None, user=None,
                        turn_id="t0", context=ASK)
    store.close()
    provider = Provider()
    # every request gets the lesson
    memory = MemorySettings(enabled=True, control=0.0, budget_ms=RETRIEVAL_ROOM_MS)
    with open_client(tmp_path, provider, capture=False, memory=memory) as client:
        client.portal.call(client.app_state["deps"].memory.refresh, True)
        whole = client.post("/v1/chat/completions", json=CHAT)
        with client.stream("POST", "/v1/chat/completions",
                           json={**CHAT, "stream": True}) as answer:
            streamed = b"".join(answer.iter_bytes())
        turns = records(client, submitted=2)
    assert whole.status_code == 200 and whole.json()["choices"][0]["message"]["content"] == (
        "Five apples.")
    assert streamed.endswith(b"data: [DONE]\n\n")
    assert all(r["messages"][0]["content"].endswith(HINT_MARKER + "Say how many apples in "
                                                    "words.") for r in provider.requests)
    assert [t["response"]["choices"][0]["message"]["content"] for t in turns] == [
        "Five apples.", "Five apples."]
    for turn in turns:  # text only: judged and learned from, never trained on
        assert turn["prompt_token_ids"] is None and not turn["completion_token_ids"]
        assert turn["untrainable"] == "no prompt token ids"
        assert turn["lessons"]["hint"] == "Say how many apples in words."
