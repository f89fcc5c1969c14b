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
    # clipped: the clamp engaged and the max took its error. Without the first test, V_old + (V − V_old) differing
    # from V by one rounding counted unclipped tokens (0 vs 1/48 between one process and two ranks)
    clipped = ((values - old_values).abs() > clip_range) & (clipped_error > unclipped_error)
    return ClippedLossOutput(loss, masked_mean(clipped.float(), mask).detach())


def dpg_loss(
    policy_logps: Tensor,
    target_logps: Tensor,
    proposal_logps: Tensor,
    log_z: Tensor | float = 0.0,
    baseline: bool = False,
    clip_weights: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Distributional policy gradient normalised by Ẑ, per sample: −A(x)·log π(x) for x ~ q, sequence log-probs.

    KL-DPG (Khalifa et al. 2021, Eq. 4, off-policy): A = P(x)/(Ẑ·q(x)) = p̂(x)/q(x).
    GDC++ (Korbak et al. 2022, Fact 2): A = P(x)/(Ẑ·q(x)) − π(x)/q(x); the baseline π/q has zero mean under q.
    ``log_z`` = log Ẑ, the running estimate of log Z (``log_z=0`` gives the unnormalised P/q of the GDC code);
    ``target_logps`` = log P(x) (−inf where P = 0).

    **Why Ẑ.** The GDC code uses P/q and P/q − Ẑ·π/q unnormalised. For a target far from q (a KL-control target
    a·exp(r/β) with small β: log P − log q = r/β) P/q exceeds float32 once log P − log q > 88.7 and float64 once
    > 709, and the loss and every gradient become inf/NaN. Here the weights are formed in log space and float64,
    w = exp(log P − log q − log Ẑ), as disco does (its initial release's ``KLLoss(use_baseline=True)`` is exactly
    this form). When Ẑ is the running mean of P/q over samples that include this batch, every w is at most the
    number of samples in that mean, so the advantage is finite in float32 (or bf16) whatever log P − log q is.

    **Step size.** Both advantages are the GDC code's divided by the positive constant Ẑ, so the gradient is the GDC
    code's gradient × 1/Ẑ: the same direction. Keeping the unnormalised scale is exactly what overflows, so the
    scale is not restored. With AdamW (``AlignmentModule``'s optimizer, and the papers' Adam) a constant positive
    gradient scale cancels in the update up to ``adam_epsilon``, so the effective step is the GDC code's; Ẑ's drift
    as the running mean settles (fast early in a run) rescales gradients over time, which Adam's moment estimates
    absorb over their horizon. With plain SGD the step is the GDC code's at learning rate ``lr/Ẑ``.

    ``log_z = −inf`` (no sample with P > 0 seen yet) gives A = 0, as the unnormalised form does (P/q = 0 and Ẑ = 0).
    ``clip_weights`` caps the normalised weight P/(Ẑ·q) (scale-free: c = c times the average weight; off by default).
    Returns (loss [B], advantage [B]) in the dtype of ``policy_logps``.
    """
    log_z = torch.as_tensor(log_z, dtype=torch.float64, device=policy_logps.device)
    log_weights = target_logps.double() - proposal_logps.double()
    if bool(torch.isneginf(log_z)):  # no sample of p yet: nothing to move towards
        advantage = torch.zeros_like(log_weights)
    else:
        advantage = torch.exp(log_weights - log_z)  # P/(Ẑq): exp(−inf) = 0 where P(x) = 0
        if clip_weights is not None:
            advantage = advantage.clamp(max=clip_weights)
        if baseline:
            advantage = advantage - torch.exp(policy_logps.detach().double() - proposal_logps.double())  # π/q
    advantage = advantage.to(policy_logps.dtype)
    return -advantage * policy_logps, advantage
