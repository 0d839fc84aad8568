"""Each loss against numbers computed by hand."""

import math

import pytest
import torch

from nextstate.learner.losses import (
    binary_advantages,
    clipped_surrogate,
    combined_advantages,
    kl_to_reference,
    opd_advantages,
)

MASK = torch.tensor([[1.0, 1.0, 0.0]])


def test_binary_advantage_is_the_reward_on_every_real_token():
    a = binary_advantages(torch.tensor([-1.0, 1.0]), torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    assert a.tolist() == [[-1.0, -1.0], [1.0, 0.0]]


def test_opd_advantage_is_the_clipped_teacher_student_gap():
    teacher = torch.tensor([[-0.5, -3.0, 0.0]])
    old = torch.tensor([[-1.0, -1.0, 0.0]])
    assert opd_advantages(teacher, old, MASK, clip=1.0).tolist() == [[0.5, -1.0, 0.0]]


def test_combined_takes_the_teacher_where_there_is_a_hint_and_the_reward_elsewhere():
    teacher = torch.tensor([[-0.5, -2.0]] * 3)
    old = torch.tensor([[-1.0, -1.0]] * 3)
    mask = torch.ones(3, 2)
    a = combined_advantages(teacher, old, torch.tensor([-1.0, 1.0, 0.0]),
                            has_teacher_B=torch.tensor([1.0, 0.0, 1.0]),
                            has_reward_B=torch.tensor([1.0, 1.0, 0.0]), mask_B_T=mask,
                            w_opd=2.0, w_rl=0.5)
    # turn 0, corrected with a hint: the teacher only, and only what it likes less,
    # 2·(0, −1); turn 1, thanked: 0.5·1; turn 2, a hint without a reward: the teacher
    assert a.tolist() == [[0.0, -2.0], [0.5, 0.5], [1.0, -2.0]]


def test_a_corrected_turn_learns_from_its_teacher_only_what_to_avoid():
    # The hinted teacher likes token 0 more than the student did and token 1 less: on a
    # rejected reply only the second is a signal (the first, rewarded, would teach what
    # the user rejected whenever the hint was misread); on an approved one, both are.
    teacher = torch.tensor([[-0.2, -3.0]] * 2)
    old = torch.tensor([[-1.0, -1.0]] * 2)
    a = combined_advantages(teacher, old, torch.tensor([-1.0, 1.0]),
                            has_teacher_B=torch.ones(2), has_reward_B=torch.ones(2),
                            mask_B_T=torch.ones(2, 2))
    assert a.tolist() == [[0.0, -1.0], [pytest.approx(0.8), -1.0]]


def test_surrogate_at_ratio_one_is_minus_the_mean_advantage():
    logp = torch.tensor([[-1.0, -2.0, -9.0]], requires_grad=True)
    loss, stats = clipped_surrogate(logp, logp.detach(), torch.tensor([[1.0, 3.0, 100.0]]),
                                    MASK)
    assert loss.item() == pytest.approx(-2.0)  # −(1 + 3)/2; the padded token is ignored
    assert stats.clip_fraction == 0.0 and stats.approx_kl == 0.0
    loss.backward()
    # d/dlogp of −r·A/2 at r=1 is −A/2 per real token, 0 for padding
    assert logp.grad.tolist() == [[-0.5, -1.5, 0.0]]


def test_surrogate_clips_asymmetrically():
    old = torch.zeros(1, 2)
    # ratios e^0.5 ≈ 1.65 (positive advantage: capped at 1.28) and e^-0.5 ≈ 0.61
    # (negative advantage: pessimistic min keeps max(0.61, 0.8)·A)
    logp = torch.tensor([[0.5, -0.5]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0]])
    loss, stats = clipped_surrogate(logp, old, adv, torch.ones(1, 2))
    expected = -(1.28 * 1.0 + 0.8 * -1.0) / 2
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert stats.clip_fraction == 1.0
    loss.backward()
    assert logp.grad.tolist() == [[0.0, 0.0]]  # clipped tokens give no gradient


def test_importance_weight_is_truncated():
    logp = torch.zeros(1, 2, requires_grad=True)
    sampler = torch.tensor([[0.0, -5.0]])  # sampler thought token 2 unlikely: w = e^5 → 2
    loss, stats = clipped_surrogate(logp, logp.detach(), torch.ones(1, 2), torch.ones(1, 2),
                                    sampler_logprobs_B_T=sampler, importance_cap=2.0)
    assert float(loss) == pytest.approx(-(1.0 + 2.0) / 2)
    assert stats.importance_weight == pytest.approx(1.5)


def test_k3_kl_by_hand():
    logp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    delta = math.log(0.25) - math.log(0.5)
    expected = math.exp(delta) - delta - 1
    assert float(kl_to_reference(logp, ref, torch.ones(1, 1))) == pytest.approx(expected)
