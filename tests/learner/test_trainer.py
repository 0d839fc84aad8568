"""The trainer on the real toy model (CPU): signals move the policy the right way."""

from __future__ import annotations

import pytest
import torch

from nextstate.learner.items import TrainItem, microbatches
from nextstate.learner.trainer import Trainer, TrainerConfig

PROMPT = [1, 40, 41, 42, 2, 1, 43]
COMPLETION = [50, 51, 52, 53]


def item(reward=None, teacher=None, sampler=None) -> TrainItem:
    return TrainItem(turn_id="t", prompt_ids=PROMPT, completion_ids=COMPLETION,
                     sampler_logprobs=sampler or [-7.0] * 4, reward=reward,
                     teacher_logprobs=teacher)


def mean_logprob(trainer, it) -> float:
    return float(trainer.logprobs([it])[0].mean())


@pytest.mark.parametrize("reward", [1.0, -1.0])
def test_binary_reward_moves_the_completion_in_its_direction(toy_model, reward):
    trainer = Trainer(toy_model, TrainerConfig(method="binary", learning_rate=1e-2))
    before = mean_logprob(trainer, item())
    stats = trainer.step([item(reward=reward)] * 4)
    after = mean_logprob(trainer, item())
    assert (after - before) * reward > 0.05
    assert stats.kl > 0 and stats.tokens == 16 and stats.reward_mean == reward


def test_a_step_that_pushes_the_sampled_tokens_down_reports_both_kl_estimates(toy_model):
    """Tokens sampled before the step, pushed down: the gate's `kl` (KL after ‖ before)
    counts a fall of Δ nats as e^Δ, KL(before ‖ after) as about Δ; both are reported."""
    trainer = Trainer(toy_model, TrainerConfig(method="binary", learning_rate=3e-2))
    before = trainer.logprobs([item()])[0]
    stats = trainer.step([item(reward=-1.0)] * 4)
    fall = float((before - trainer.logprobs([item()])[0]).max())
    assert stats.extra["largest_fall"] == pytest.approx(fall, abs=1e-5) and fall > 0.1
    assert stats.kl > stats.extra["kl_before_after"] > 0


def test_opd_pulls_toward_the_teacher(toy_model):
    trainer = Trainer(toy_model, TrainerConfig(method="opd", learning_rate=1e-2))
    old = trainer.logprobs([item()])[0].tolist()
    teacher = [lp + 0.8 for lp in old]  # the hinted teacher likes these tokens more
    before = mean_logprob(trainer, item())
    stats = trainer.step([item(teacher=teacher)] * 4)
    assert mean_logprob(trainer, item()) > before + 0.05
    assert stats.advantage_mean == pytest.approx(0.8, abs=1e-4)


def test_a_turn_served_with_lessons_is_not_weighted_back_toward_its_sampler(toy_model):
    """Context distillation: the sampler saw the lessons, the student does not, so the
    tokens the lessons made likely would get a tiny importance weight min(π_old/π_sampler,
    C), cancelling what is to be learned; such turns are weighted 1."""
    old = Trainer(toy_model).logprobs([item()])[0].tolist()
    teacher = [lp + 0.8 for lp in old]
    sampler = [lp + 5.0 for lp in old]  # far likelier with the lessons in the prompt
    weights = []
    for context in (False, True):
        trainer = Trainer(toy_model, TrainerConfig(method="opd", learning_rate=1e-2))
        served = item(teacher=teacher, sampler=sampler)
        served.context = context
        beside = item(teacher=teacher, sampler=old)  # sampled by this policy: weight 1
        weights.append(trainer.step([served, beside]).importance_weight)
    assert weights[0] == pytest.approx((2.718 ** -5 + 1) / 2, rel=0.01)
    assert weights[1] == pytest.approx(1.0, rel=0.01)


def test_combined_with_no_signal_changes_nothing(toy_model):
    trainer = Trainer(toy_model, TrainerConfig(method="combined"))
    before = trainer.logprobs([item()])[0]
    trainer.step([item()])
    assert torch.allclose(trainer.logprobs([item()])[0], before)


def test_save_resume_and_restore_round_trip(toy_model, tmp_path):
    trainer = Trainer(toy_model, TrainerConfig(method="binary", learning_rate=1e-2))
    trainer.step([item(reward=1.0)])
    saved = trainer.logprobs([item()])[0]
    trainer.save(tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()
    assert (tmp_path / "a" / "optimizer.pt").exists()
    resumed = Trainer(toy_model, TrainerConfig(method="binary", learning_rate=1e-2),
                      resume_from=tmp_path / "a")
    assert torch.allclose(resumed.logprobs([item()])[0], saved, atol=1e-6)
    snapshot = resumed.snapshot()
    resumed.step([item(reward=-1.0)])
    assert not torch.allclose(resumed.logprobs([item()])[0], saved, atol=1e-4)
    resumed.restore(snapshot)
    assert torch.allclose(resumed.logprobs([item()])[0], saved, atol=1e-6)


def test_microbatches_respect_the_token_budget(toy_model):
    trainer = Trainer(toy_model, TrainerConfig(max_tokens_per_microbatch=24))
    items = [item()] * 5  # 11 tokens each: two fit in 24
    assert list(microbatches(items, 24)) == [[0, 1], [2, 3], [4]]
    full = Trainer(toy_model, TrainerConfig())
    one = full.logprobs(items)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(one, trainer.logprobs(items),
                                                                 strict=True))


def test_one_trainer_swaps_adapters_in_and_out(toy_model, tmp_path):
    """Personal adapters: one trainer (one base model in memory) trains several adapters
    in turn, each loaded with its weights and optimizer state."""
    config = TrainerConfig(method="binary", learning_rate=1e-2)
    trainer = Trainer(toy_model, config)
    fresh = trainer.snapshot()
    base = trainer.logprobs([item()])[0]
    trainer.step([item(reward=1.0)])
    trainer.save(tmp_path / "up")
    up = trainer.logprobs([item()])[0]
    trainer.restore(fresh)
    assert torch.allclose(trainer.logprobs([item()])[0], base, atol=1e-6)
    trainer.step([item(reward=-1.0)])
    trainer.save(tmp_path / "down")

    trainer.load(tmp_path / "up")
    assert torch.allclose(trainer.logprobs([item()])[0], up, atol=1e-6)
    trainer.step([item(reward=1.0)])  # continues as one trainer that never swapped would
    alone = Trainer(toy_model, config, resume_from=tmp_path / "up")
    alone.step([item(reward=1.0)])
    assert torch.allclose(trainer.logprobs([item()])[0], alone.logprobs([item()])[0],
                          atol=1e-5)
    trainer.load(tmp_path / "down")
    assert float(trainer.logprobs([item()])[0].mean()) < float(base.mean())


def test_loading_an_adapter_of_another_rank_is_refused_clearly(toy_model, tmp_path):
    Trainer(toy_model, TrainerConfig(lora_rank=8)).save(tmp_path / "r8")
    with pytest.raises(ValueError, match="rank 8"):
        Trainer(toy_model, TrainerConfig()).load(tmp_path / "r8")


def test_an_item_with_images_goes_alone_in_its_microbatch():
    def with_images(n: int) -> TrainItem:
        return TrainItem(turn_id="i", prompt_ids=PROMPT, completion_ids=COMPLETION,
                         sampler_logprobs=[-7.0] * 4, images=["data:image/png;base64,"] * n)

    batch = [item(), with_images(1), item(), item(), with_images(2), with_images(1)]
    assert list(microbatches(batch, 10_000)) == [[0], [1], [2, 3], [4], [5]]


def test_a_text_model_refuses_a_turn_with_images_in_a_sentence(toy_model):
    image_turn = TrainItem(turn_id="gui-1", prompt_ids=PROMPT, completion_ids=COMPLETION,
                           sampler_logprobs=[-7.0] * 4, reward=1.0,
                           images=["data:image/png;base64,"])
    with pytest.raises(ValueError, match="gui-1 has images, and the base model reads text"):
        Trainer(toy_model).step([image_turn])
