"""Token-level policy-gradient losses as pure functions (torch only, no Lightning): PPO's clipped surrogate and
clipped value loss (Schulman et al. 2017), the k1 / k3 KL estimators (Schulman 2020), and the distributional policy
gradient of distribution matching (Khalifa et al. 2021; Korbak et al. 2022).

Inputs are per-token tensors ``[B, T]`` with a completion mask, reduced by a token-level
:func:`~lit_align.losses.masked.masked_mean` over the (micro-)batch; :func:`kl_penalty` is unreduced (one value per
token). :func:`dpg_loss` is the exception: it takes sequence-summed log-probs and returns one loss per sample.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lit_align.losses.masked import masked_mean

__all__ = ["ClippedLossOutput", "kl_penalty", "clipped_policy_loss", "clipped_value_loss", "dpg_loss"]


class ClippedLossOutput(NamedTuple):
    """A masked-mean clipped loss and the fraction of tokens where the clipped branch was active."""

    loss: Tensor
    clipfrac: Tensor


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(π‖π_ref) from samples of π (Schulman 2020, "Approximating KL divergence").

    With ``log r = log π_ref − log π``: ``k1 = −log r`` (unbiased, can be negative) and
    ``k3 = (r − 1) − log r`` (unbiased, always ≥ 0, lower variance). TRL's ``kl_estimator`` names.
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator '{estimator}'; choose 'k1' or 'k3'")


def clipped_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float = 0.2
) -> ClippedLossOutput:
    """PPO's clipped surrogate (Schulman et al. 2017, Eq. 7), negated for minimisation, token-level masked mean:
    ``L = mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)))`` with ``ρ = exp(log π − log π_old)``."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    return ClippedLossOutput(loss, masked_mean((clipped > unclipped).float(), mask).detach())


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float = 0.2
) -> ClippedLossOutput:
    """Clipped value loss of PPO's reference implementation (as in TRL and OpenAI baselines):
    ``L = ½·mean(max((V − R)², (clip(V, V_old ± ε_v) − R)²))``."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    return ClippedLossOutput(loss, masked_mean((clipped_error > unclipped_error).float(), mask).detach())


def dpg_loss(
    policy_logps: Tensor,
    target_logps: Tensor,
    proposal_logps: Tensor,
    z: Tensor | float = 1.0,
    baseline: bool = False,
    clip_weights: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Distributional policy gradient, per sample: −A(x)·log π(x) for x ~ q, with sequence log-probs.

    KL-DPG (Khalifa et al. 2021, Eq. 4, off-policy): A = P(x)/q(x), an unbiased estimate of ∇ CE(p, π) up to 1/Z.
    GDC++ (Korbak et al. 2022, Fact 2): A = P(x)/q(x) − Ẑ·π(x)/q(x), the baseline Ẑ·π/q has zero mean under q.
    ``target_logps`` = log P(x) (−inf where P = 0); ``clip_weights`` caps P/q (off by default).
    Returns (loss [B], advantage [B]).
    """
    weights = torch.exp(target_logps.double() - proposal_logps.double())
    if clip_weights is not None:
        weights = weights.clamp(max=clip_weights)
    advantage = weights
    if baseline:
        advantage = weights - float(z) * torch.exp(policy_logps.detach().double() - proposal_logps.double())
    advantage = advantage.to(policy_logps.dtype)
    return -advantage * policy_logps, advantage
