"""Sampler logprobs the proxy left out (``sampler_logprobs = "recompute"``): recorded
without them, kept out of training, then recomputed by the learner (against fakes; the
real vLLM's numbers are checked in tests/integration/test_sampler_logprobs.py)."""

import httpx
import orjson
import pytest

from nextstate.core.records import TO_RECOMPUTE
from nextstate.core.store import Store
from nextstate.core.store.schema import turns
from nextstate.core.vllm import VLLMClient
from nextstate.learner.sampler_logprobs import recompute_pending
from tests.proxy.fake_vllm import LOGPROBS, PROMPT_IDS, TOKEN_IDS, FakeVLLM
from tests.proxy.test_app import direct, open_client, records

PLAIN = {"model": "toy", "temperature": 0,
         "messages": [{"role": "user", "content": "Say hello."}]}


def scoring(seen: list, status: int = 200) -> httpx.MockTransport:
    """A vLLM that scores token i of the prompt at LOGPROBS-like values: the completion's
    three tokens get LOGPROBS exactly."""

    def vllm(request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        seen.append(body)
        if status != 200:
            return httpx.Response(status, json={"error": {"message": "no such model"}})
        prompt = body["prompt"]
        scores = [None] + [{str(t): {"logprob": -1.0}} for t in prompt[1:]]
        for i, lp in enumerate(LOGPROBS, start=len(prompt) - len(LOGPROBS)):
            scores[i] = {str(prompt[i]): {"logprob": lp}}
        return httpx.Response(200, json={"choices": [{"prompt_logprobs": scores}]})

    return httpx.MockTransport(vllm)


def client_for(transport: httpx.AsyncBaseTransport) -> VLLMClient:
    return VLLMClient("http://vllm", retries=0, http=httpx.AsyncClient(transport=transport))


def recorded_without_logprobs(tmp_path, *bodies):
    fake = FakeVLLM()
    with open_client(tmp_path, fake, sampler_logprobs="recompute") as client:
        for body in bodies:
            answer = client.post("/v1/chat/completions", json=body)
            assert answer.content == direct(fake, body) or orjson.loads(
                answer.content) == orjson.loads(direct(fake, body))
        rows = records(client, len(bodies))
    return fake, rows


@pytest.mark.parametrize("stream", [False, True])
def test_a_plain_request_goes_out_without_logprobs_and_waits_for_the_learner(
        tmp_path, stream):
    fake, [row] = recorded_without_logprobs(tmp_path, {**PLAIN, "stream": stream})
    assert fake.requests[0]["return_token_ids"] is True
    assert "logprobs" not in fake.requests[0]
    assert row["completion_token_ids"] == TOKEN_IDS and row["logprobs"] is None
    store = Store(f"sqlite:///{tmp_path}/s.db")
    [waiting] = store.turns.to_recompute()
    assert waiting["id"] == row["turn_id"]
    assert store.judgments.ready_for_training("binary", 10) == []
    store.close()


def test_a_request_that_shapes_its_sampling_still_records_its_logprobs(tmp_path):
    fake, [row] = recorded_without_logprobs(tmp_path, {**PLAIN, "temperature": 0.7})
    assert fake.requests[0]["logprobs"] is True
    assert row["logprobs"] == LOGPROBS


async def test_the_learner_recomputes_them_under_the_model_that_served_the_turn(tmp_path):
    _, [row] = recorded_without_logprobs(tmp_path, PLAIN)
    store = Store(f"sqlite:///{tmp_path}/s.db")
    seen: list = []
    report = await recompute_pending(store, client_for(scoring(seen)))
    assert (report.recomputed, report.lost, report.waiting) == (1, 0, 0)
    assert seen == [{"model": "toy", "prompt": PROMPT_IDS + TOKEN_IDS, "max_tokens": 1,
                     "temperature": 0, "prompt_logprobs": 0}]
    turn = store.turns.get(row["turn_id"])
    assert turn is not None and turn["logprobs"] == LOGPROBS
    assert store.turns.to_recompute() == []
    assert (await recompute_pending(store, client_for(scoring(seen)))).recomputed == 0
    store.close()


async def test_a_turn_whose_version_is_gone_is_never_trained_on(tmp_path):
    _, [row] = recorded_without_logprobs(tmp_path, PLAIN)
    store = Store(f"sqlite:///{tmp_path}/s.db")
    report = await recompute_pending(store, client_for(scoring([], status=404)))
    assert (report.recomputed, report.lost) == (0, 1)
    assert store.turns.to_recompute() == []
    with store.db.connect() as conn:
        untrainable = conn.execute(turns.select().where(turns.c.id == row["turn_id"])).first()
    assert untrainable is not None and "no longer has" in untrainable.untrainable
    assert untrainable.logprobs is None
    store.close()


async def test_an_unreachable_vllm_leaves_the_turn_waiting(tmp_path):
    recorded_without_logprobs(tmp_path, PLAIN)
    store = Store(f"sqlite:///{tmp_path}/s.db")

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    report = await recompute_pending(store, client_for(httpx.MockTransport(down)))
    assert (report.recomputed, report.lost, report.waiting) == (0, 0, 1)
    [still] = store.turns.to_recompute()
    with store.db.connect() as conn:
        row = conn.execute(turns.select().where(turns.c.id == still["id"])).first()
    assert row is not None and row.untrainable == TO_RECOMPUTE
    store.close()
