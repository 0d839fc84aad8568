"""The LiteLLM callback: real LiteLLM calls, recorded into a SQLite store.

agent -> LiteLLM -> vLLM; LiteLLM callback -> store. Tests marked integration call the real
vLLM serving the toy model; the others use LiteLLM's own ``mock_response``, which runs the
same callback path without a backend.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import litellm
import pytest
from transformers import AutoTokenizer

from nextstate.adapters.litellm import NextStateLogger
from nextstate.core.records import TurnRecord
from nextstate.core.store import Store
from nextstate.learner.judgment import Judgment
from tests.conftest import MODEL_NAME

HELLO = [{"role": "user", "content": "Hello, how are you?"}]
TOKENS = {"return_token_ids": True, "logprobs": True}
# LiteLLM copies `litellm.callbacks` into these lists on first use; restore them all.
CALLBACK_LISTS = ("callbacks", "success_callback", "failure_callback", "input_callback",
                  "_async_success_callback", "_async_failure_callback")


def ask(vllm: Any, **kwargs: Any) -> dict[str, Any]:
    return {"model": f"hosted_vllm/{MODEL_NAME}", "api_base": f"{vllm.url}/v1",
            "messages": HELLO, "temperature": 0, "max_tokens": 8, **kwargs}


@contextmanager
def registered(logger: NextStateLogger) -> Iterator[NextStateLogger]:
    saved = {name: list(getattr(litellm, name)) for name in CALLBACK_LISTS}
    quiet = litellm.suppress_debug_info
    litellm.callbacks, litellm.suppress_debug_info = [logger], True
    try:
        yield logger
    finally:
        logger.close()
        for name, value in saved.items():
            setattr(litellm, name, value)
        litellm.suppress_debug_info = quiet


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/s.db"


@pytest.fixture
def recorder(store_url: str) -> Iterator[NextStateLogger]:
    with registered(NextStateLogger(store_url)) as logger:
        yield logger


def recorded(store_url: str, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
    """The store's turns once it holds ``count`` (LiteLLM runs callbacks after returning)."""
    store = Store(store_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            rows = list(store.turns.iterate())
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)
    finally:
        store.close()


def trainable_ids(store_url: str, turn: dict[str, Any]) -> list[str]:
    """The turn's id if the learner would train on it once judged, else nothing."""
    learner = Store(store_url)
    try:
        learner.judgments.save(turn["turn_id"], Judgment(score=-1))
        return [row["id"] for row in learner.judgments.ready_for_training("binary", 10)]
    finally:
        learner.close()


@pytest.mark.integration
def test_call_is_recorded_with_messages_reply_session_and_token_ids(
        vllm, recorder, store_url, toy_model):
    reply = litellm.completion(**ask(vllm), metadata={"session_id": "lite-1"},
                               extra_body=TOKENS)
    [turn] = recorded(store_url, 1)
    assert turn["turn_id"] == reply._hidden_params["litellm_call_id"]
    assert (turn["session_id"], turn["status"], turn["http_status"]) == ("lite-1", "ok", 200)
    assert turn["request"] == {"model": MODEL_NAME, "messages": HELLO, "temperature": 0,
                               "max_tokens": 8, **TOKENS}
    text = reply.choices[0].message.content
    assert turn["response"]["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert turn["served_model"] == MODEL_NAME
    # LiteLLM keeps vLLM's token ids when not streaming: they are recorded exactly.
    assert turn["completion_token_ids"] == reply.choices[0].provider_specific_fields["token_ids"]
    assert len(turn["completion_token_ids"]) == reply.usage.completion_tokens > 0
    tokenizer = AutoTokenizer.from_pretrained(toy_model)
    assert tokenizer.decode(turn["completion_token_ids"], skip_special_tokens=True) == text
    assert turn["prompt_token_ids"] == tokenizer.apply_chat_template(
        HELLO, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert turn["logprobs"] == pytest.approx(
        [e.logprob for e in reply.choices[0].logprobs.content])
    assert turn["next_state_status"] == "pending"
    assert turn["untrainable"] is None and trainable_ids(store_url, turn) == [turn["turn_id"]]


@pytest.mark.integration
def test_without_return_token_ids_only_text_is_recorded(vllm, recorder, store_url):
    reply = litellm.completion(**ask(vllm))
    [turn] = recorded(store_url, 1)
    assert turn["response"]["choices"][0]["message"]["content"] == reply.choices[0].message.content
    assert (turn["prompt_token_ids"], turn["completion_token_ids"]) == (None, [])
    assert turn["untrainable"] == "no prompt token ids"


@pytest.mark.integration
def test_stream_keeps_the_sampled_token_ids_litellm_passes_on_and_marks_what_it_drops(
        vllm, recorder, store_url, toy_model):
    pieces, client_ids, usage = [], [], None
    for chunk in litellm.completion(**ask(vllm), stream=True, extra_body=TOKENS,
                                    stream_options={"include_usage": True},
                                    metadata={"session_id": "lite-stream"}):
        usage = getattr(chunk, "usage", None) or usage
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            client_ids += getattr(chunk.choices[0], "token_ids", None) or []
    [turn] = recorded(store_url, 1)
    text = "".join(pieces)
    assert turn["session_id"] == "lite-stream"
    assert turn["request"]["stream"] is True and turn["ttft_ms"] is not None
    assert turn["response"]["choices"][0]["message"]["content"] == text != ""
    assert len(client_ids) == usage.completion_tokens > 0  # what vLLM sampled
    # What reaches the callback depends on LiteLLM's version (1.106 passed no token ids
    # on, 1.110 passes the completion's but not the prompt's nor the logprobs). Whatever
    # it passes on is recorded only if it is what vLLM sampled; a turn missing any piece
    # is kept, says what it lacks, and is never trained on.
    ids = turn["completion_token_ids"]
    if ids:
        assert ids == client_ids
        tokenizer = AutoTokenizer.from_pretrained(toy_model)
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    if turn["untrainable"] is None:
        assert ids and turn["prompt_token_ids"] and len(turn["logprobs"]) == len(ids)
        assert trainable_ids(store_url, turn) == [turn["turn_id"]]
    else:
        assert trainable_ids(store_url, turn) == []


@pytest.mark.integration
async def test_async_calls_pair_next_states_and_keep_side_turns_apart(vllm, recorder,
                                                                     store_url):
    first = await litellm.acompletion(**ask(vllm), metadata={"session_id": "lite-2"})
    await litellm.acompletion(**ask(vllm), metadata={"session_id": "lite-2",
                                                     "turn_type": "side"})
    # Callbacks of async calls run on this loop: wait off it. The next main turn must
    # reach the store after the first, as it would in a real conversation.
    await asyncio.to_thread(recorded, store_url, 2)
    answer = {"role": "user", "content": "No, try again."}
    messages = [*HELLO, {"role": "assistant", "content": first.choices[0].message.content},
                answer]
    stream = await litellm.acompletion(**ask(vllm, messages=messages), stream=True,
                                       metadata={"session_id": "lite-2"})
    async for _ in stream:
        pass
    turns = await asyncio.to_thread(recorded, store_url, 3)
    assert [t["turn_type"] for t in turns] == ["main", "side", "main"]
    assert turns[0]["next_state"] == [answer]
    assert turns[0]["next_turn_id"] == turns[2]["turn_id"]
    assert turns[1]["next_state_status"] == "n/a"


@pytest.mark.integration
def test_failed_call_is_recorded_as_upstream_error(vllm, recorder, store_url):
    with pytest.raises(litellm.NotFoundError):
        litellm.completion(**ask(vllm, model="hosted_vllm/no-such-model"),
                           metadata={"session_id": "lite-err"})
    [turn] = recorded(store_url, 1)
    assert (turn["status"], turn["http_status"]) == ("upstream_error", 404)
    assert "The model `no-such-model` does not exist" in turn["error"]  # vLLM's own text
    assert turn["request"]["model"] == "no-such-model" and turn["session_id"] == "lite-err"
    assert turn["next_state_status"] == "n/a"


class FlakyStore:
    """A store that hangs until released, then fails ``failures`` times, then works."""

    def __init__(self, url: str, failures: int) -> None:
        self.store, self.failures = Store(url), failures
        self.turns = self  # what the logger writes through
        self.entered, self.release = threading.Event(), threading.Event()

    def write(self, records: Sequence[TurnRecord]) -> int:
        self.entered.set()
        self.release.wait()
        if self.failures:
            self.failures -= 1
            raise ConnectionError("store is down")
        return self.store.turns.write(records)

    def close(self) -> None:
        self.store.close()


@pytest.mark.integration
def test_store_outage_neither_breaks_nor_slows_calls_and_records_land_later(vllm, store_url):
    flaky = FlakyStore(store_url, failures=2)
    with registered(NextStateLogger(store=flaky)) as logger:
        litellm.completion(**ask(vllm))
        assert flaky.entered.wait(10)  # the writer holds the first record; the store hangs
        second = litellm.completion(**ask(vllm))  # answered while the store still hangs
        assert not flaky.release.is_set() and second.choices[0].message.content is not None
        flaky.release.set()
        assert len(recorded(store_url, 2)) == 2
        assert logger.flush(5)
        assert (logger.stats.store_errors, logger.stats.written, logger.stats.dropped) == (
            2, 2, 0)
        assert logger.stats.last_error == "ConnectionError: store is down"


def test_full_queue_drops_and_counts_without_raising(store_url):
    flaky = FlakyStore(store_url, failures=0)
    mock = {"model": "hosted_vllm/m", "messages": HELLO, "mock_response": "hi"}
    with registered(NextStateLogger(store=flaky, queue_size=1)) as logger:
        litellm.completion(**mock)
        assert flaky.entered.wait(10)  # the writer is stuck on the first record
        for _ in range(2):  # one fits in the queue, the next is dropped
            litellm.completion(**mock)
        deadline = time.monotonic() + 10
        while logger.stats.submitted < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (logger.stats.submitted, logger.stats.dropped) == (3, 1)
        flaky.release.set()
        assert logger.flush(10) and logger.stats.written == 2
    assert len(recorded(store_url, 2)) == 2


def test_proxy_headers_set_session_and_secrets_are_not_recorded(recorder, store_url):
    # Behind the LiteLLM proxy, callbacks find the client's headers in metadata["headers"].
    headers = {"X-Session-Id": "s1", "X-Turn-Type": "side", "Authorization": "Bearer sk-1"}
    litellm.embedding(model="openai/e", input=["x"], mock_response=[0.1])  # not a chat call
    litellm.completion(model="hosted_vllm/m", messages=HELLO, mock_response="hi",
                       metadata={"headers": headers}, api_key="sk-secret")
    [turn] = recorded(store_url, 1)
    assert (turn["session_id"], turn["turn_type"]) == ("s1", "side")
    assert turn["response"]["choices"][0]["message"]["content"] == "hi"
    assert "sk-" not in str(turn)
