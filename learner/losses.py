"""Losses and advantages for training on served traffic (learner -> trainer).

Pure functions over tensors; shapes are in the names: B turns in a micro-batch, T
completion tokens (padded, with ``mask_B_T`` marking real ones).

The data is off-policy by nature: each turn was sampled by whatever adapter was serving
at the time, possibly several versions ago, and by vLLM's kernels rather than the
trainer's. Two ratios handle that, as in PPO with truncated importance sampling:

- ``ratio = π_θ / π_old`` where π_old are logprobs the *trainer* recomputes with the
  current weights at the start of the step: the clipped surrogate keeps each step close
  to where it started.
- ``w = min(π_old / π_sampler, C)`` where π_sampler are the logprobs vLLM recorded:
  a truncated importance weight corrects (with bounded variance) for the sampler being a
  different, older or numerically different policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossStats:
    loss: float
    clip_fraction: float  # share of tokens whose ratio was clipped
    approx_kl: float  # mean (log π_old − log π_θ): how far the step moved the policy
    importance_weight: float  # mean truncated importance weight


def masked_mean(values_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> torch.Tensor:
    return (values_B_T * mask_B_T).sum() / mask_B_T.sum().clamp(min=1)


def clipped_surrogate(
    logprobs_B_T: torch.Tensor,
    old_logprobs_B_T: torch.Tensor,
    advantages_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    sampler_logprobs_B_T: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    importance_cap: float = 2.0,
) -> tuple[torch.Tensor, LossStats]:
    """PPO-style clipped surrogate with asymmetric clipping, token-level mean.

        r_t = exp(logπ_θ(t) − logπ_old(t))
        w_t = min(exp(logπ_old(t) − logπ_sampler(t)), C)          (1 without sampler)
        L   = − Σ_t m_t · w_t · min(r_t·A_t, clip(r_t, 1−ε_low, 1+ε_high)·A_t) / Σ_t m_t

    ``logprobs_B_T`` carries the gradient; the others are constants.
    """
    ratio_B_T = torch.exp(logprobs_B_T - old_logprobs_B_T)
    clipped_B_T = ratio_B_T.clamp(1.0 - eps_low, 1.0 + eps_high)
    surrogate_B_T = torch.minimum(ratio_B_T * advantages_B_T, clipped_B_T * advantages_B_T)
    if sampler_logprobs_B_T is None:
        weight_B_T = torch.ones_like(ratio_B_T)
    else:
        weight_B_T = torch.exp(old_logprobs_B_T - sampler_logprobs_B_T).clamp(max=importance_cap)
    loss = -masked_mean(weight_B_T.detach() * surrogate_B_T, mask_B_T)
    with torch.no_grad():
        was_clipped = (ratio_B_T != clipped_B_T).float()
        stats = LossStats(
            loss=float(loss),
            clip_fraction=float(masked_mean(was_clipped, mask_B_T)),
            approx_kl=float(masked_mean(old_logprobs_B_T - logprobs_B_T, mask_B_T)),
            importance_weight=float(masked_mean(weight_B_T, mask_B_T)),
        )
    return loss, stats


def kl_to_reference(logprobs_B_T: torch.Tensor, ref_logprobs_B_T: torch.Tensor,
                    mask_B_T: torch.Tensor) -> torch.Tensor:
    """Non-negative k3 estimate of KL(π_θ ‖ π_ref) on the sampled tokens:

        KL ≈ mean_t [ exp(Δ_t) − Δ_t − 1 ],   Δ_t = logπ_ref(t) − logπ_θ(t)
    """
    delta_B_T = ref_logprobs_B_T - logprobs_B_T
    return masked_mean(torch.exp(delta_B_T) - delta_B_T - 1.0, mask_B_T)


def binary_advantages(rewards_B: torch.Tensor, mask_B_T: torch.Tensor) -> torch.Tensor:
    """Binary RL: the turn's reward r ∈ {+1, −1} is every completion token's advantage.

        A_t = r
    """
    return rewards_B[:, None] * mask_B_T


def opd_advantages(teacher_logprobs_B_T: torch.Tensor, old_logprobs_B_T: torch.Tensor,
                   mask_B_T: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    """On-policy distillation: how much more the hinted teacher likes each sampled token
    than the student does, clipped for stability.

        A_t = clip(logπ_teacher(t) − logπ_old(t), −c, c)
    """
    return (teacher_logprobs_B_T - old_logprobs_B_T).clamp(-clip, clip) * mask_B_T


def combined_advantages(
    teacher_logprobs_B_T: torch.Tensor,
    old_logprobs_B_T: torch.Tensor,
    rewards_B: torch.Tensor,
    has_teacher_B: torch.Tensor,
    has_reward_B: torch.Tensor,
    mask_B_T: torch.Tensor,
    w_opd: float = 1.0,
    w_rl: float = 1.0,
    clip: float = 1.0,
) -> torch.Tensor:
    """Both signals, each where it is sharpest: a turn with a hint learns token by token
    from the teacher; a turn with only a reward (a thank-you, a verdict) from the reward.
        A_t = w_opd · [has teacher] · D_t
            + w_rl  · [has reward] · [no teacher] · r
        D_t = clip(logπ_teacher(t) − logπ_old(t), ±c)            (no reward, or r ≥ 0)
            = min(0, clip(logπ_teacher(t) − logπ_old(t), ±c))    (r < 0: corrected)
    A corrected turn's −1 and its hint are one judgment: the −1 says the reply was wrong,
    the hint says which of its tokens (those the hinted teacher likes less than the
    student did), where the −1 alone would push down every token, the right ones too. A
    token of a rejected reply that the teacher likes *more* is left alone: if the hint was
    understood it teaches little (it was sampled, so it was already likely), and if it was
    misread it rewards exactly what the user rejected. Both measured on the learning
    benchmark (bench/README.md, "Corrected turns learn only what to avoid").
    """
    opd_B_T = opd_advantages(teacher_logprobs_B_T, old_logprobs_B_T, mask_B_T, clip)
    corrected_B = (has_reward_B > 0) & (rewards_B < 0)
    opd_B_T = torch.where(corrected_B[:, None], opd_B_T.clamp(max=0.0), opd_B_T)
    rl_B_T = binary_advantages(rewards_B, mask_B_T)
    reward_only_B = has_reward_B * (1.0 - has_teacher_B)
    return w_opd * has_teacher_B[:, None] * opd_B_T + w_rl * reward_only_B[:, None] * rl_B_T
