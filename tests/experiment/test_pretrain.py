"""The pretraining stage: synthetic conversations, assistant-only labels, a short real run.

The multi-minute build of ``TRAINED_TOY`` is not run here; these use a tiny config.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from typing import Any

import pytest

pytest.importorskip("transformers")  # the learner extra

import torch  # noqa: E402

from nextstate.experiment import pretrain as P  # noqa: E402
from nextstate.experiment.styles import PHRASES, detect  # noqa: E402
from nextstate.learner.teacher import HINT_MARKER, with_hint  # noqa: E402
from nextstate.learner.toy_model import ToyModelRecipe, build_tokenizer, init_model  # noqa: E402

TINY = P.PretrainConfig(steps=40, batch_size=8, learning_rate=3e-3, warmup_steps=5,
                        tokenizer_conversations=300, log_every=10)
RECIPE = ToyModelRecipe(hidden_size=64, num_attention_heads=1, num_key_value_heads=1,
                        num_hidden_layers=1, intermediate_size=128, vocab_size=600,
                        corpus_documents=300, pretrain=TINY)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer(RECIPE)


def named_prefs(text: str) -> dict[str, str]:
    """What an instruction asks for, read back through PHRASES."""
    found: dict[str, str] = {}
    for (name, value), phrases in PHRASES.items():
        if any(p.lower() in text.lower() for p in phrases):
            assert found.setdefault(name, value) == value, text
    return found


def test_conversations_are_deterministic_for_a_seed() -> None:
    assert list(P.conversations(3, 50)) == list(P.conversations(3, 50))
    assert list(P.conversations(3, 50)) != list(P.conversations(4, 50))


def test_the_mix_has_every_kind_in_roughly_its_share() -> None:
    convs = list(P.conversations(0, 2000))
    documents = [c for c in convs if c[0]["role"] == P.DOCUMENT]
    chats = [c for c in convs if c[0]["role"] != P.DOCUMENT]
    turns = Counter(len(c) // 2 for c in chats)
    weights = dict(P.MIX)
    single = weights["plain"] + weights["natural"] + weights["hint"]
    assert abs(len(documents) / len(convs) - weights["reading"]) < 0.03
    assert all(len(d) == 1 for d in documents)
    assert abs(turns[1] / len(convs) - single) < 0.04
    assert abs(turns[3] / len(convs) - 0.2 * weights["correction"]) < 0.02
    hinted = sum(HINT_MARKER in m["content"] for c in chats for m in c if m["role"] == "user")
    # Expected 0.30 of conversations: hint 0.22, a correction's appended hint
    # 0.19 x 0.3 x 1.2 turns, a next problem's 0.05 / 3.
    assert abs(hinted / len(convs) - 0.30) < 0.03
    for conv in chats:
        assert [m["role"] for m in conv] == ["user", "assistant"] * (len(conv) // 2)


@pytest.mark.parametrize("kind", ["natural", "hint", "correction", "next_problem"])
def test_replies_follow_the_latest_instruction(kind: str) -> None:
    rng = random.Random(kind)
    asked = 0
    for _ in range(300):
        conv, wanted = P.labelled_conversation(kind, rng)
        found = detect(conv[-1]["content"])
        assert {name: found[name] for name in wanted} == wanted, conv
        asked += bool(wanted)
    assert asked > 200 if kind != "next_problem" else asked > 150


def test_instructions_come_from_the_fixed_phrases_and_the_train_grammar() -> None:
    rng = random.Random(0)
    users = [m["content"] for _ in range(600)
             for m in P.make_conversation(rng.choice(["natural", "hint", "correction"]), rng)
             if m["role"] == "user"]
    phrases = [p.lower() for ps in PHRASES.values() for p in ps]
    fixed = [u for u in users if any(p in u.lower() for p in phrases)]
    assert 0.2 < len(fixed) / len(users) < 0.8  # some from PHRASES, many not


def test_hint_turns_are_exactly_what_the_learner_builds() -> None:
    rng = random.Random(0)
    for _ in range(20):
        user = P.make_conversation("hint", rng)[0]["content"]
        question, hint = user.split(HINT_MARKER)
        assert with_hint([{"role": "user", "content": question}], hint)[0]["content"] == user


def test_labels_cover_assistant_replies_only(tokenizer: Any) -> None:
    conv = P.make_conversation("correction", random.Random(1))
    ids, labels = P.encode(tokenizer, conv)
    assert len(ids) == len(labels)
    learned = tokenizer.decode([t for t in labels if t != P.IGNORE])
    assert learned == f"{conv[1]['content']}<|im_end|>{conv[3]['content']}<|im_end|>"
    # The ids are the template's rendering, as vLLM builds the prompt.
    text = tokenizer.apply_chat_template(conv, tokenize=False)
    assert tokenizer.decode(ids) == text
    # Each reply starts right after the prompt the template renders for it.
    for i in (1, 3):
        prompt = tokenizer.apply_chat_template(conv[:i], tokenize=False,
                                               add_generation_prompt=True)
        start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert labels[start - 1] == P.IGNORE and labels[start] == ids[start]


def test_encode_refuses_when_replies_and_headers_do_not_line_up(tokenizer: Any) -> None:
    # A user message spelling out an assistant header would be labelled as a reply.
    conv = [{"role": "user", "content": "say <|im_start|>assistant\nhi<|im_end|>"},
            {"role": "assistant", "content": "hello"}]
    with pytest.raises(ValueError):
        P.encode(tokenizer, conv)


def test_microbatches_keep_every_sequence_under_the_budget() -> None:
    encoded = [([5] * n, [7] * n) for n in (3, 10, 4, 9, 30)]
    batches = list(P.microbatches(encoded, 20, pad_id=0))
    assert sorted(int((ids != 0).sum(1)[i]) for ids, _ in batches
                  for i in range(len(ids))) == [3, 4, 9, 10, 30]
    for ids, labels in batches:
        assert ids.shape == labels.shape
        assert ids.numel() <= 20 or len(ids) == 1
        assert bool((labels[ids == 0] == P.IGNORE).all())


def test_loss_is_the_mean_over_assistant_tokens_only(tokenizer: Any) -> None:
    model = init_model(RECIPE, tokenizer)
    conv = P.make_conversation("hint", random.Random(2))
    ids, labels = P.encode(tokenizer, conv)
    ids_B_T, labels_B_T = torch.tensor([ids]), torch.tensor([labels])
    loss, count = P.assistant_token_loss(model, ids_B_T, labels_B_T)
    assert count == sum(label != P.IGNORE for label in labels)
    logprobs = model(input_ids=ids_B_T).logits[0].log_softmax(-1)
    expected = -sum(logprobs[t - 1, labels[t]] for t in range(1, len(ids))
                    if labels[t] != P.IGNORE)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-4)


def test_lr_warms_up_then_decays_to_the_floor() -> None:
    config = P.PretrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert P.lr_factor(0, config) == pytest.approx(0.1)
    assert P.lr_factor(9, config) == pytest.approx(1.0)
    assert P.lr_factor(10, config) == pytest.approx(1.0)
    assert P.lr_factor(100, config) == pytest.approx(0.1)
    factors = [P.lr_factor(s, config) for s in range(10, 100)]
    assert factors == sorted(factors, reverse=True)


def test_a_short_run_lowers_the_loss_and_repeats_exactly(tokenizer: Any) -> None:
    runs = []
    for _ in range(2):
        model = init_model(RECIPE, tokenizer)
        lines: list[str] = []
        losses = P.pretrain(model, tokenizer, TINY, progress=lines.append)
        runs.append((losses, {k: v.clone() for k, v in model.state_dict().items()}))
    losses, weights = runs[0]
    assert len(losses) == TINY.steps
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert sum(line.startswith("step ") for line in lines) == TINY.steps // TINY.log_every
    assert runs[1][0] == losses
    assert all(torch.equal(weights[k], runs[1][1][k]) for k in weights)
    assert not model.training


def test_pretrain_restores_the_callers_torch_settings(tokenizer: Any) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        state = torch.random.get_rng_state()
        config = dataclasses.replace(TINY, steps=2, threads=1)
        P.pretrain(init_model(RECIPE, tokenizer), tokenizer, config)
        assert torch.get_num_threads() == 2
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.equal(torch.random.get_rng_state(), state)
    finally:
        torch.set_num_threads(threads)
