"""Teacher prompts and teacher logprobs, against a vLLM-shaped fake."""

import httpx
import orjson
import pytest

from nextstate.core.vllm import VLLMClient
from nextstate.learner.teacher import (
    HINT_MARKER,
    Teacher,
    TeacherError,
    completion_logprobs,
    with_hint,
)


def test_hint_is_appended_to_the_last_user_message_only():
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "tool", "content": "t"}]
    out = with_hint(messages, "Be brief.")
    assert out[2]["content"] == "c\n\n[user's hint / instruction]\nBe brief."
    assert out[0]["content"] == "a"
    assert messages[2]["content"] == "c"  # the turn's own request is untouched


def test_hint_is_added_as_a_text_part_to_list_content():
    out = with_hint([{"role": "user", "content": [{"type": "text", "text": "q"}]}], "h")
    assert out[0]["content"][-1] == {"type": "text", "text": HINT_MARKER + "h"}


def test_completion_logprobs_are_picked_by_position_and_token():
    scored = [None, {"5": {"logprob": -1.0}}, {"7": {"logprob": -0.5}},
              {"9": {"logprob": -2.0}, "3": {"logprob": -0.1}}]
    assert completion_logprobs(scored, [7, 9], prompt_len=2) == [-0.5, -2.0]
    with pytest.raises(TeacherError):
        completion_logprobs(scored, [7, 8], prompt_len=2)


def scoring_vllm(seen: list) -> httpx.MockTransport:
    """/tokenize gives three tokens; /v1/completions scores token i at -i."""

    def vllm(request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        seen.append((request.url.path, body))
        if request.url.path == "/tokenize":
            return httpx.Response(200, json={"tokens": [1, 2, 3]})
        return httpx.Response(200, json={"choices": [{"prompt_logprobs": [None] + [
            {str(t): {"logprob": -float(i)}} for i, t in enumerate(body["prompt"][1:], 1)]}]})

    return httpx.MockTransport(vllm)


async def test_teacher_tokenizes_the_hinted_prompt_and_scores_the_recorded_tokens():
    seen = []
    vllm = scoring_vllm(seen)
    teacher = Teacher(VLLMClient("http://vllm", http=httpx.AsyncClient(transport=vllm)),
                      "base")
    turn = {"endpoint": "chat", "request": {"messages": [{"role": "user", "content": "q"}],
                                             "tools": [{"type": "function"}]},
            "prompt_token_ids": [1, 2], "completion_token_ids": [8, 9]}
    assert await teacher.logprobs(turn, "hint") == [-3.0, -4.0]
    path, body = seen[0]
    assert path == "/tokenize" and body["tools"] == [{"type": "function"}]
    assert body["messages"][0]["content"].endswith(HINT_MARKER + "hint")
    assert seen[1][1]["prompt"] == [1, 2, 3, 8, 9]
    # Without a hint the recorded prompt ids are used as they are.
    assert await teacher.logprobs(turn, None) == [-2.0, -3.0]
    assert seen[-1][1]["prompt"] == [1, 2, 8, 9]
    await teacher.close()


async def test_a_policy_teacher_is_the_adapter_serving_each_turns_user():
    """--teacher policy: a user with their own adapter is taught by it, everyone else by
    the shared adapter (and by the base model while there is none)."""
    from nextstate.core.routing import Router

    seen = []
    router = Router("p", base_model="base")
    teacher = Teacher(VLLMClient("http://vllm", http=httpx.AsyncClient(
        transport=scoring_vllm(seen))), "base", router=router)

    async def models(user):
        turn = {"endpoint": "chat", "user": user, "completion_token_ids": [8, 9],
                "request": {"messages": [{"role": "user", "content": "q"}]}}
        await teacher.logprobs(turn, "hint")
        return {body["model"] for _, body in seen[-2:]}, teacher.model_for(turn)

    assert await models("alice") == ({"base"}, "base")
    router.update({"p": ("p@000001", "/a/1"), "p~alice": ("p~alice@000002", "/a/2")})
    assert await models("alice") == ({"p~alice@000002"}, "p~alice@000002")
    assert await models("bob") == ({"p@000001"}, "p@000001")
    assert await models(None) == ({"p@000001"}, "p@000001")
    await teacher.close()
    plain = Teacher(VLLMClient("http://vllm"), "base")  # --teacher base: always the base
    assert plain.model_for({"user": "alice"}) == "base"
    await plain.close()


async def test_the_learner_records_each_turns_own_teacher(tmp_path, monkeypatch):
    """The learner follows the store's current adapters for its policy teacher: each
    judgment names the adapter whose logprobs taught it."""
    from nextstate.core.store import Store
    from nextstate.learner.process import Learner, LearnerConfig
    from tests.learner.test_judging import FakeJudge, turn

    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    records = []
    for user, session in (("alice", "a"), ("bob", "b")):
        pair = [turn(session, "q", "r", 1.0), turn(session, "no, in French", "bonjour", 2.0)]
        for rec in pair:
            rec.user = user
        records += pair
    store.turns.write(records)
    for version, policy in ((1, "p"), (2, "p~alice")):
        store.adapters.stage(version, f"{policy}@{version:06d}", policy, f"/a/{version}", {})
        store.adapters.publish(version, [], policy)
    learner = Learner(LearnerConfig(store_url=url, backends=("http://vllm",),
                                    base_model="p", teacher="policy"), judge=FakeJudge())
    await learner.teacher.vllm.aclose()
    learner.teacher.vllm = VLLMClient("http://vllm", http=httpx.AsyncClient(
        transport=scoring_vllm([])))
    try:
        await learner.step()
    finally:
        await learner.close()
    assert [store.judgments.get(r.turn_id)["teacher_model"] for r in records[0::2]] == [
        "p~alice@000002", "p@000001"]
    store.close()


@pytest.mark.parametrize("how", ["option", "env"])
def test_learn_gives_the_backends_key_to_every_client_it_makes(monkeypatch, tmp_path, how):
    """``nextstate learn --backend-api-key`` (or NEXTSTATE_BACKEND_API_KEY): the teacher
    and each backend's publisher get it (the client sends it on every call:
    tests/core/test_vllm.py)."""
    from click.testing import CliRunner

    from nextstate import cli
    from nextstate.learner import process

    made: list[tuple[str, str | None]] = []
    real = process.VLLMClient
    monkeypatch.setattr(process, "VLLMClient", lambda url, key, **kw: (
        made.append((url, key)), real(url, key, **kw))[1])

    async def one_round(self):
        return 0

    monkeypatch.setattr(process.Learner, "step", one_round)
    args = ["learn", "--backend", "http://a:8000", "--backend", "http://b:8000", "--no-train",
            "--once", "--store", f"sqlite:///{tmp_path / 's.db'}"]
    if how == "option":
        args += ["--backend-api-key", "k"]
    else:
        monkeypatch.setenv("NEXTSTATE_BACKEND_API_KEY", "k")
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    assert made == [("http://a:8000", "k"), ("http://a:8000", "k"), ("http://b:8000", "k")]
